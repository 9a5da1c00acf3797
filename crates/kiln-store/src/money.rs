//! Money and prices, in exact integers.
//!
//! An amount is a count of nano-units (1e-9) of the platform currency in an
//! `i64`: sums and differences are exact, and the range (±9.2e9 units) is far
//! beyond any budget. Prices are nano-units per million tokens, so a price
//! like 0.15 per million tokens is 150_000_000 and one token costs 150
//! nano-units. A call's cost is rounded up to the next nano-unit once, on its
//! total, never per token.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Nano-units per unit of currency.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;
/// The largest amount an API accepts for a balance, credit or limit: one
/// billion units. Anything larger is a typo, not a budget.
pub const MAX_AMOUNT: Money = Money(1_000_000_000 * NANOS_PER_UNIT);
/// The largest price per million tokens: one million units.
pub const MAX_PRICE: Money = Money(1_000_000 * NANOS_PER_UNIT);

/// An amount of the platform currency, in nano-units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(pub i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn nanos(self) -> i64 {
        self.0
    }

    /// Parses a decimal amount in units: `12`, `-3.5`, `0.000000001`.
    /// At most nine digits after the point; no exponent, no sign on zero.
    pub fn parse(text: &str) -> Result<Money, String> {
        let t = text.trim();
        let (negative, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        let plain = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && frac.is_empty() || !plain(whole) || !plain(frac) {
            return Err(format!("`{text}` is not a decimal amount"));
        }
        if frac.len() > 9 {
            return Err(format!(
                "`{text}` has more than 9 digits after the decimal point"
            ));
        }
        let too_big = || format!("`{text}` is too large");
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_big())?
        };
        let frac_nanos: i64 = format!("{frac:0<9}").parse().unwrap_or(0);
        let nanos = whole
            .checked_mul(NANOS_PER_UNIT)
            .and_then(|n| n.checked_add(frac_nanos))
            .ok_or_else(too_big)?;
        Ok(Money(if negative { -nanos } else { nanos }))
    }

    /// Reads an amount given as a JSON number or a decimal string. Numbers go
    /// through their shortest decimal text, so `0.1` is exactly 0.1.
    pub fn from_json(v: &serde_json::Value) -> Result<Money, String> {
        match v {
            serde_json::Value::String(s) => Money::parse(s),
            serde_json::Value::Number(n) => {
                let text = n.to_string();
                if text.contains(['e', 'E']) {
                    return Err(format!(
                        "`{text}`: write amounts as plain decimals, without an exponent"
                    ));
                }
                Money::parse(&text)
            }
            other => Err(format!("`{other}` is not an amount")),
        }
    }

    /// Whether the amount is within ±[`MAX_AMOUNT`].
    pub fn is_reasonable(self) -> bool {
        self.0.unsigned_abs() <= MAX_AMOUNT.0.unsigned_abs()
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }
}

/// Decimal units with up to nine places, trailing zeros dropped: `1.5`, `0`,
/// `-0.000000001`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let per = NANOS_PER_UNIT.unsigned_abs();
        let (whole, frac) = (abs / per, abs % per);
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let frac = format!("{frac:09}");
            write!(f, "{sign}{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

/// Amounts travel as decimal strings, so no JSON parser rounds them.
impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Money::from_json(&v).map_err(serde::de::Error::custom)
    }
}

/// A model's prices, per million tokens, in the platform currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prices {
    pub currency: String,
    /// Prompt tokens not served from a prefix cache.
    pub input: Money,
    /// Prompt tokens served from a prefix cache.
    pub cached_input: Money,
    pub output: Money,
}

/// Token counts of one call, as charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenCounts {
    /// All prompt tokens, cached ones included (OpenAI's convention).
    pub prompt: u64,
    /// Of `prompt`, those served from a prefix cache.
    pub cached: u64,
    pub completion: u64,
}

impl Prices {
    /// Checks each price is between 0 and [`MAX_PRICE`].
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("input", self.input),
            ("cached_input", self.cached_input),
            ("output", self.output),
        ] {
            if p < Money::ZERO {
                return Err(format!("the {name} price {p} is negative"));
            }
            if p > MAX_PRICE {
                return Err(format!(
                    "the {name} price {p} per million tokens is above the limit of {MAX_PRICE}"
                ));
            }
        }
        Ok(())
    }

    /// What `tokens` cost: the exact sum, rounded up to a whole nano-unit.
    /// Saturates at `i64::MAX` nano-units (never reached by real calls).
    pub fn cost(&self, tokens: TokenCounts) -> Money {
        let cached = tokens.cached.min(tokens.prompt);
        let uncached = tokens.prompt - cached;
        let micro = i128::from(uncached) * i128::from(self.input.0)
            + i128::from(cached) * i128::from(self.cached_input.0)
            + i128::from(tokens.completion) * i128::from(self.output.0);
        let nanos = (micro + 999_999) / 1_000_000;
        Money(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    /// The most a call can cost: every prompt token uncached, every allowed
    /// completion token generated.
    pub fn worst_case(&self, prompt_tokens: u64, max_completion_tokens: u64) -> Money {
        self.cost(TokenCounts {
            prompt: prompt_tokens,
            cached: 0,
            completion: max_completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(Money::parse("12"), Ok(Money(12 * NANOS_PER_UNIT)));
        assert_eq!(Money::parse("0.15"), Ok(Money(150_000_000)));
        assert_eq!(Money::parse("-3.5"), Ok(Money(-3_500_000_000)));
        assert_eq!(Money::parse(".5"), Ok(Money(500_000_000)));
        assert_eq!(Money::parse("0.000000001"), Ok(Money(1)));
        for bad in [
            "",
            "-",
            ".",
            "1.2.3",
            "abc",
            "1e3",
            "0.0000000001",
            "1,5",
            "99999999999999",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn amounts_print_and_round_trip() {
        for (nanos, text) in [
            (0, "0"),
            (1, "0.000000001"),
            (-1_500_000_000, "-1.5"),
            (150_000_000, "0.15"),
            (7 * NANOS_PER_UNIT, "7"),
        ] {
            assert_eq!(Money(nanos).to_string(), text);
            assert_eq!(Money::parse(text), Ok(Money(nanos)));
        }
        let json = serde_json::to_string(&Money(2_250_000_000)).unwrap_or_default();
        assert_eq!(json, "\"2.25\"");
        let back: Money = serde_json::from_str("0.1").unwrap_or_default();
        assert_eq!(back, Money(100_000_000));
        assert!(serde_json::from_str::<Money>("1e30").is_err());
        assert!(serde_json::from_str::<Money>("true").is_err());
    }

    #[test]
    fn costs_round_up_once_on_the_total() {
        let p = Prices {
            currency: "USD".into(),
            input: Money::parse("0.15").unwrap_or_default(),
            cached_input: Money::parse("0.075").unwrap_or_default(),
            output: Money::parse("0.6").unwrap_or_default(),
        };
        // 1000 uncached + 200 cached prompt tokens, 50 completion tokens.
        let c = p.cost(TokenCounts {
            prompt: 1200,
            cached: 200,
            completion: 50,
        });
        assert_eq!(c, Money(150 * 1000 + 75 * 200 + 600 * 50));
        // A third of a nano-unit rounds up to one.
        let tiny = Prices {
            currency: "USD".into(),
            input: Money(333_333),
            cached_input: Money(0),
            output: Money(0),
        };
        let one = TokenCounts {
            prompt: 1,
            ..TokenCounts::default()
        };
        assert_eq!(tiny.cost(one), Money(1));
        assert_eq!(tiny.cost(TokenCounts::default()), Money(0));
        assert_eq!(p.worst_case(10, 5), Money(150 * 10 + 600 * 5));
        let huge = TokenCounts {
            prompt: u64::MAX,
            cached: 0,
            completion: u64::MAX,
        };
        assert_eq!(p.cost(huge), Money(i64::MAX));
    }

    #[test]
    fn prices_are_bounded() {
        let mut p = Prices {
            currency: "USD".into(),
            input: Money(1),
            cached_input: Money(0),
            output: Money(1),
        };
        assert!(p.validate().is_ok());
        p.output = Money(-1);
        assert!(p.validate().is_err());
        p.output = Money(MAX_PRICE.0 + 1);
        assert!(p.validate().is_err());
    }
}

//! The `calculator` tool: a hand-written recursive-descent evaluator for
//! arithmetic expressions.
//!
//! Grammar (`^` is right-associative and binds tighter than unary minus, so
//! `-2^2` is `-4` and `2^3^2` is `512`):
//!
//! ```text
//! expr    := term (('+' | '-') term)*
//! term    := unary (('*' | '/' | '%') unary)*
//! unary   := ('-' | '+') unary | power
//! power   := primary ('^' unary)?
//! primary := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'
//! ```
//!
//! Invariants: input is capped at [`MAX_EXPRESSION_CHARS`] characters and
//! recursion at [`MAX_DEPTH`] levels, so no input can exhaust the stack;
//! every intermediate value is finite (an operation producing NaN or an
//! infinity is an error naming the operation and its position). Positions
//! are 1-based character offsets into the expression.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::tool::{parse_args, Tool, ToolError, ToolFuture, ToolOutput};

/// Longest expression accepted, in characters.
pub const MAX_EXPRESSION_CHARS: usize = 1024;
/// Deepest nesting of parentheses, unary signs and powers accepted.
pub const MAX_DEPTH: usize = 64;

const FUNCTIONS: &str = "sqrt, abs, ln, log10, exp, sin, cos, tan, floor, ceil, round, min, max";

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalcError {
    #[error("the expression is empty")]
    Empty,
    #[error("the expression is too long ({len} characters; the limit is {max})")]
    TooLong { len: usize, max: usize },
    #[error(
        "the expression is nested too deeply at position {position} (the limit is {max} levels)"
    )]
    TooDeep { position: usize, max: usize },
    #[error("unexpected `{found}` at position {position}")]
    Unexpected { found: char, position: usize },
    #[error("unexpected end of expression; expected {expected}")]
    UnexpectedEnd { expected: &'static str },
    #[error("invalid number `{text}` at position {position}")]
    InvalidNumber { text: String, position: usize },
    #[error(
        "unknown name `{name}` at position {position}; functions: {FUNCTIONS}; constants: pi, e"
    )]
    UnknownName { name: String, position: usize },
    #[error("`{name}` at position {position} is a function; call it like `{name}(x)`")]
    FunctionWithoutArguments { name: String, position: usize },
    #[error("`{name}` at position {position} is a constant, not a function")]
    ConstantCalled { name: String, position: usize },
    #[error("`{name}` at position {position} takes {expected}, got {got}")]
    WrongArgumentCount {
        name: String,
        position: usize,
        expected: &'static str,
        got: usize,
    },
    #[error("division by zero at position {position}")]
    DivisionByZero { position: usize },
    #[error("`{operation}` at position {position} does not give a finite number")]
    NotFinite { operation: String, position: usize },
}

/// Evaluates `expression` and returns its value.
pub fn evaluate(expression: &str) -> Result<f64, CalcError> {
    let chars: Vec<char> = expression.chars().take(MAX_EXPRESSION_CHARS + 1).collect();
    if chars.len() > MAX_EXPRESSION_CHARS {
        return Err(CalcError::TooLong {
            len: expression.chars().count(),
            max: MAX_EXPRESSION_CHARS,
        });
    }
    let mut parser = Parser {
        chars,
        pos: 0,
        depth: 0,
    };
    parser.skip_whitespace();
    if parser.at_end() {
        return Err(CalcError::Empty);
    }
    let value = parser.expr()?;
    parser.skip_whitespace();
    if let Some(found) = parser.peek() {
        return Err(CalcError::Unexpected {
            found,
            position: parser.pos + 1,
        });
    }
    Ok(value)
}

/// Formats a result for the model: integers without a fraction, very large
/// or very small magnitudes in exponent notation.
pub fn format_number(x: f64) -> String {
    if x == 0.0 {
        return "0".to_owned();
    }
    if x.fract() == 0.0 && x.abs() < 1e15 {
        // Exact: |x| < 2^53 and integral.
        return format!("{}", x as i64);
    }
    if x.abs() >= 1e15 || x.abs() < 1e-6 {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Skips whitespace and returns the next character without consuming it.
    fn next_token_char(&mut self) -> Option<char> {
        self.skip_whitespace();
        self.peek()
    }

    fn unexpected(&self, expected: &'static str) -> CalcError {
        match self.peek() {
            Some(found) => CalcError::Unexpected {
                found,
                position: self.pos + 1,
            },
            None => CalcError::UnexpectedEnd { expected },
        }
    }

    fn expr(&mut self) -> Result<f64, CalcError> {
        let mut acc = self.term()?;
        loop {
            let op = match self.next_token_char() {
                Some(c @ ('+' | '-')) => c,
                _ => return Ok(acc),
            };
            let position = self.pos + 1;
            self.pos += 1;
            let rhs = self.term()?;
            acc = if op == '+' { acc + rhs } else { acc - rhs };
            finite(acc, op.to_string(), position)?;
        }
    }

    fn term(&mut self) -> Result<f64, CalcError> {
        let mut acc = self.unary()?;
        loop {
            let op = match self.next_token_char() {
                Some(c @ ('*' | '/' | '%')) => c,
                _ => return Ok(acc),
            };
            let position = self.pos + 1;
            self.pos += 1;
            let rhs = self.unary()?;
            acc = match op {
                '*' => acc * rhs,
                _ if rhs == 0.0 => return Err(CalcError::DivisionByZero { position }),
                '/' => acc / rhs,
                _ => acc % rhs,
            };
            finite(acc, op.to_string(), position)?;
        }
    }

    fn unary(&mut self) -> Result<f64, CalcError> {
        self.skip_whitespace();
        if self.depth >= MAX_DEPTH {
            return Err(CalcError::TooDeep {
                position: self.pos + 1,
                max: MAX_DEPTH,
            });
        }
        self.depth += 1;
        let result = match self.peek() {
            Some('-') => {
                self.pos += 1;
                self.unary().map(|v| -v)
            }
            Some('+') => {
                self.pos += 1;
                self.unary()
            }
            _ => self.power(),
        };
        self.depth -= 1;
        result
    }

    fn power(&mut self) -> Result<f64, CalcError> {
        let base = self.primary()?;
        if self.next_token_char() != Some('^') {
            return Ok(base);
        }
        let position = self.pos + 1;
        self.pos += 1;
        let exponent = self.unary()?;
        finite(base.powf(exponent), "^".to_owned(), position)
    }

    fn primary(&mut self) -> Result<f64, CalcError> {
        match self.next_token_char() {
            Some(c) if c.is_ascii_digit() || c == '.' => self.number(),
            Some(c) if c.is_ascii_alphabetic() || c == '_' => self.name(),
            Some('(') => {
                self.pos += 1;
                let v = self.expr()?;
                self.expect_char(')', "`)`")?;
                Ok(v)
            }
            _ => Err(self.unexpected("a number, a name or `(`")),
        }
    }

    fn expect_char(&mut self, want: char, expected: &'static str) -> Result<(), CalcError> {
        if self.next_token_char() == Some(want) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }

    fn number(&mut self) -> Result<f64, CalcError> {
        let start = self.pos;
        let digit_at = |p: &Parser, i: usize| p.chars.get(i).is_some_and(char::is_ascii_digit);
        while digit_at(self, self.pos) {
            self.pos += 1;
        }
        if self.peek() == Some('.') {
            self.pos += 1;
            while digit_at(self, self.pos) {
                self.pos += 1;
            }
        }
        // An exponent only when digits follow, so `2e` stays `2` then `e`.
        if matches!(self.peek(), Some('e' | 'E')) {
            let after_sign = match self.chars.get(self.pos + 1) {
                Some('+' | '-') => self.pos + 2,
                _ => self.pos + 1,
            };
            if digit_at(self, after_sign) {
                self.pos = after_sign;
                while digit_at(self, self.pos) {
                    self.pos += 1;
                }
            }
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        let value: f64 = text.parse().map_err(|_| CalcError::InvalidNumber {
            text: text.clone(),
            position: start + 1,
        })?;
        finite(value, text, start + 1)
    }

    fn name(&mut self) -> Result<f64, CalcError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        let name: String = self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .to_ascii_lowercase();
        let position = start + 1;
        let constant = match name.as_str() {
            "pi" => Some(std::f64::consts::PI),
            "e" => Some(std::f64::consts::E),
            _ => None,
        };
        let is_call = self.next_token_char() == Some('(');
        if let Some(value) = constant {
            return if is_call {
                Err(CalcError::ConstantCalled { name, position })
            } else {
                Ok(value)
            };
        }
        if !is_function(&name) {
            return Err(CalcError::UnknownName {
                name: crate::tool::truncate_for_message(&name, 32),
                position,
            });
        }
        if !is_call {
            return Err(CalcError::FunctionWithoutArguments { name, position });
        }
        self.pos += 1;
        let mut args = vec![self.expr()?];
        while self.next_token_char() == Some(',') {
            self.pos += 1;
            args.push(self.expr()?);
        }
        self.expect_char(')', "`,` or `)`")?;
        apply_function(&name, &args, position)
    }
}

fn is_function(name: &str) -> bool {
    matches!(
        name,
        "sqrt"
            | "abs"
            | "ln"
            | "log10"
            | "exp"
            | "sin"
            | "cos"
            | "tan"
            | "floor"
            | "ceil"
            | "round"
            | "min"
            | "max"
    )
}

fn apply_function(name: &str, args: &[f64], position: usize) -> Result<f64, CalcError> {
    let value = match (name, args) {
        ("min", [first, rest @ ..]) => rest.iter().fold(*first, |a, b| a.min(*b)),
        ("max", [first, rest @ ..]) => rest.iter().fold(*first, |a, b| a.max(*b)),
        ("min" | "max", _) => {
            return Err(CalcError::WrongArgumentCount {
                name: name.to_owned(),
                position,
                expected: "at least one argument",
                got: args.len(),
            })
        }
        (_, [x]) => match name {
            "sqrt" => x.sqrt(),
            "abs" => x.abs(),
            "ln" => x.ln(),
            "log10" => x.log10(),
            "exp" => x.exp(),
            "sin" => x.sin(),
            "cos" => x.cos(),
            "tan" => x.tan(),
            "floor" => x.floor(),
            "ceil" => x.ceil(),
            // Half away from zero.
            _ => x.round(),
        },
        _ => {
            return Err(CalcError::WrongArgumentCount {
                name: name.to_owned(),
                position,
                expected: "one argument",
                got: args.len(),
            })
        }
    };
    finite(value, format!("{name}(…)"), position)
}

fn finite(value: f64, operation: String, position: usize) -> Result<f64, CalcError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(CalcError::NotFinite {
            operation,
            position,
        })
    }
}

/// The `calculator` tool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Calculator;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalculatorArgs {
    expression: String,
}

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn description(&self) -> &str {
        "Evaluates an arithmetic expression exactly as written and returns the number. \
         Supports + - * / % ^ (power), parentheses, sqrt abs ln log10 exp sin cos tan \
         (radians) floor ceil round min max, and the constants pi and e."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The expression, for example `2 * (3 + 4) ^ 2 / sqrt(16)`.",
                    "maxLength": MAX_EXPRESSION_CHARS,
                }
            },
            "required": ["expression"],
            "additionalProperties": false,
        })
    }

    fn call<'a>(&'a self, args: &'a Value) -> ToolFuture<'a> {
        Box::pin(async move {
            let args: CalculatorArgs = parse_args(args)?;
            let value = evaluate(&args.expression).map_err(ToolError::from)?;
            Ok(ToolOutput::text(format_number(value)))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eval(s: &str) -> f64 {
        evaluate(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(eval("1 + 2 * 3"), 7.0);
        assert_eq!(eval("(1 + 2) * 3"), 9.0);
        assert_eq!(eval("2 ^ 3 ^ 2"), 512.0);
        assert_eq!(eval("-2 ^ 2"), -4.0);
        assert_eq!(eval("2 ^ -1"), 0.5);
        assert_eq!(eval("10 - 4 - 3"), 3.0);
        assert_eq!(eval("100 / 10 / 5"), 2.0);
        assert_eq!(eval("7 % 4"), 3.0);
        assert_eq!(eval("-7 % 4"), -3.0);
        assert_eq!(eval("--3"), 3.0);
        assert_eq!(eval("+3 - -3"), 6.0);
        assert_eq!(eval("2 * -3"), -6.0);
    }

    #[test]
    fn numbers() {
        assert_eq!(eval("1.5"), 1.5);
        assert_eq!(eval(".5"), 0.5);
        assert_eq!(eval("5."), 5.0);
        assert_eq!(eval("1e3"), 1000.0);
        assert_eq!(eval("1.5E-2"), 0.015);
        assert_eq!(eval("2e+2"), 200.0);
    }

    #[test]
    fn functions_and_constants() {
        assert_eq!(eval("sqrt(16)"), 4.0);
        assert_eq!(eval("abs(-3)"), 3.0);
        assert_eq!(eval("ln(e)"), 1.0);
        assert_eq!(eval("log10(1000)"), 3.0);
        assert_eq!(eval("exp(0)"), 1.0);
        assert_eq!(eval("sin(0) + cos(0)"), 1.0);
        assert!((eval("tan(pi / 4)") - 1.0).abs() < 1e-12);
        assert_eq!(eval("floor(2.7) + ceil(2.1) + round(2.5)"), 8.0);
        assert_eq!(eval("round(-2.5)"), -3.0);
        assert_eq!(eval("min(3, 1, 2)"), 1.0);
        assert_eq!(eval("max(3, 1, 2)"), 3.0);
        assert_eq!(eval("max(4)"), 4.0);
        assert_eq!(eval("PI"), std::f64::consts::PI);
        assert_eq!(eval("SQRT(4)"), 2.0);
    }

    #[test]
    fn errors_name_the_position() {
        let err = |s: &str| evaluate(s).unwrap_err().to_string();
        assert_eq!(err("1 / 0"), "division by zero at position 3");
        assert_eq!(err("5 % (2 - 2)"), "division by zero at position 3");
        assert_eq!(
            err("sqrt(-1)"),
            "`sqrt(…)` at position 1 does not give a finite number"
        );
        assert_eq!(
            err("10 ^ 400"),
            "`^` at position 4 does not give a finite number"
        );
        assert_eq!(
            err("1e999"),
            "`1e999` at position 1 does not give a finite number"
        );
        assert_eq!(
            err("ln(0)"),
            "`ln(…)` at position 1 does not give a finite number"
        );
        assert!(err("foo(1)").starts_with("unknown name `foo` at position 1; functions: sqrt"));
        assert_eq!(err("1 + 2 )"), "unexpected `)` at position 7");
        assert_eq!(err("2e"), "unexpected `e` at position 2");
        assert_eq!(err("1.2.3"), "unexpected `.` at position 4");
        assert_eq!(err("(1 + 2"), "unexpected end of expression; expected `)`");
        assert_eq!(
            err("1 +"),
            "unexpected end of expression; expected a number, a name or `(`"
        );
        assert_eq!(err("   "), "the expression is empty");
        assert_eq!(
            err("sqrt"),
            "`sqrt` at position 1 is a function; call it like `sqrt(x)`"
        );
        assert_eq!(
            err("pi(2)"),
            "`pi` at position 1 is a constant, not a function"
        );
        assert_eq!(
            err("sqrt(1, 2)"),
            "`sqrt` at position 1 takes one argument, got 2"
        );
        assert_eq!(err("."), "invalid number `.` at position 1");
        assert_eq!(err("1 # 2"), "unexpected `#` at position 3");
    }

    #[test]
    fn limits() {
        let long = "1+".repeat(600) + "1";
        assert!(matches!(
            evaluate(&long),
            Err(CalcError::TooLong {
                len: 1201,
                max: 1024
            })
        ));
        let deep = "(".repeat(200) + "1" + &")".repeat(200);
        assert!(matches!(evaluate(&deep), Err(CalcError::TooDeep { .. })));
        let signs = "-".repeat(500) + "1";
        assert!(matches!(evaluate(&signs), Err(CalcError::TooDeep { .. })));
        let powers = "1^".repeat(300) + "1";
        assert!(matches!(evaluate(&powers), Err(CalcError::TooDeep { .. })));
        // Just inside the limit works.
        let ok = "(".repeat(MAX_DEPTH - 1) + "1" + &")".repeat(MAX_DEPTH - 1);
        assert_eq!(eval(&ok), 1.0);
        // A long flat chain is not deep.
        let flat = "1+".repeat(500) + "1";
        assert_eq!(eval(&flat), 501.0);
    }

    #[test]
    fn formatting() {
        assert_eq!(format_number(3.0), "3");
        assert_eq!(format_number(-0.0), "0");
        assert_eq!(format_number(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(format_number(1e20), "1e20");
        assert_eq!(format_number(1.5e-7), "1.5e-7");
        assert_eq!(format_number(-42.0), "-42");
    }

    #[tokio::test]
    async fn tool_call() {
        let out = Calculator
            .call(&json!({"expression": "2 * (3 + 4)"}))
            .await
            .unwrap();
        assert_eq!(out.text, "14");
        let err = Calculator.call(&json!({"expr": "1"})).await.unwrap_err();
        assert_eq!(err.code(), "invalid_arguments");
        let err = Calculator
            .call(&json!({"expression": "1/0"}))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "division by zero at position 2");
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,300}") {
            let _ = evaluate(&s);
        }

        #[test]
        fn token_soup_never_panics(
            s in proptest::collection::vec(
                prop_oneof![
                    Just("("), Just(")"), Just("+"), Just("-"), Just("*"), Just("/"),
                    Just("%"), Just("^"), Just(","), Just(" "), Just("."), Just("e"),
                    Just("1"), Just("0"), Just("9.5"), Just("1e308"), Just("pi"),
                    Just("sqrt("), Just("min("), Just("ln("), Just("tan("), Just("x"),
                ],
                0..400,
            ).prop_map(|v| v.concat())
        ) {
            if let Ok(v) = evaluate(&s) {
                prop_assert!(v.is_finite());
            }
        }

        #[test]
        fn integer_sums_are_exact(a in -1_000_000i64..1_000_000, b in -1_000_000i64..1_000_000) {
            let v = evaluate(&format!("{a} + ({b})")).unwrap();
            prop_assert_eq!(format_number(v), (a + b).to_string());
        }
    }
}

//! Constrained decoding: output that always parses.
//!
//! A [`Grammar`] is compiled from a JSON Schema (`response_format`), from
//! "any JSON object", or from a list of tools (tool calls in the
//! `<tool_call>{"name": …, "arguments": …}</tool_call>` form, optionally
//! after free text). A generation under a grammar carries a [`Matcher`];
//! before each token the scheduler asks a [`MaskCache`] which tokens the
//! matcher allows (a walk of the vocabulary's [`TokenTrie`]) and samples
//! among those only, so the text is valid at every step; end-of-generation
//! is allowed exactly when the output may end, and a generation whose
//! output is complete ends at once. A generation cut short by `max_tokens`
//! ends with `length`, never `stop`.

mod grammar;
mod mask;
mod matcher;

pub use grammar::{Grammar, ToolSchema, TOOL_CALL_CLOSE, TOOL_CALL_OPEN};
pub use mask::{MaskCache, TokenSet, TokenTrie};
pub use matcher::Matcher;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::{json, Value};

    use super::*;

    fn matcher(schema: Value) -> Matcher {
        match Grammar::json_schema(&schema, true) {
            Ok(g) => Matcher::new(Arc::new(g)),
            Err(e) => panic!("schema does not compile: {e}"),
        }
    }

    fn accepts(m: &Matcher, text: &str) -> bool {
        let mut m = m.clone();
        m.advance(text.as_bytes()) && m.accepting()
    }

    /// Writes a random output the matcher allows, byte by byte: a random
    /// allowed byte, ending as soon as the output may end with probability
    /// `stop`. None when it runs past `limit` bytes.
    fn random_output(m: &Matcher, rng: &mut StdRng, stop: f64, limit: usize) -> Option<String> {
        let mut m = m.clone();
        let mut out = Vec::new();
        // Printable ASCII plus a few multi-byte characters' bytes.
        let pool: Vec<u8> = (0x20..0x7f).chain([0xc3, 0xa9, 0xe4, 0xb8, 0xad]).collect();
        while out.len() < limit {
            if m.accepting() && (m.complete() || rng.random_bool(stop)) {
                return String::from_utf8(out).ok();
            }
            let allowed: Vec<u8> = pool
                .iter()
                .copied()
                .filter(|&b| m.clone().advance(&[b]))
                .collect();
            // Bias toward closing, so outputs end.
            let b = if allowed.is_empty() {
                return None;
            } else if let Some(&c) = allowed
                .iter()
                .find(|&&c| matches!(c, b'"' | b'}' | b']') && rng.random_bool(0.3))
            {
                c
            } else {
                allowed[rng.random_range(0..allowed.len())]
            };
            assert!(m.advance(&[b]));
            out.push(b);
        }
        None
    }

    #[test]
    fn objects_follow_declared_order_required_and_types() {
        let m = matcher(json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
            "required": ["name", "tags"], "additionalProperties": false}));
        assert!(accepts(&m, r#"{"name":"x","age":3,"tags":["a"]}"#));
        assert!(accepts(&m, r#"{"name": "x", "tags": []}"#));
        assert!(!accepts(&m, r#"{"name":"x"}"#), "tags is required");
        assert!(!accepts(&m, r#"{"tags":[],"name":"x"}"#), "declared order");
        assert!(
            !accepts(&m, r#"{"name":"x","age":3.5,"tags":[]}"#),
            "integer"
        );
        assert!(!accepts(&m, r#"{"name":"x","tags":["c"]}"#), "enum");
        assert!(
            !accepts(&m, r#"{"name":"x","tags":["a","b","a"]}"#),
            "maxItems"
        );
        assert!(
            !accepts(&m, r#"{"name":"x","extra":1,"tags":[]}"#),
            "undeclared"
        );
        assert!(
            !accepts(&m, r#"{"name":"x",  "tags":[]}"#),
            "one space at most"
        );
        let mut done = m.clone();
        assert!(done.advance(br#"{"name":"x","tags":[]}"#));
        assert!(done.complete(), "nothing may follow the closing brace");
    }

    #[test]
    fn strings_escape_limit_and_stay_utf8() {
        let m = matcher(json!({"type": "string", "minLength": 2, "maxLength": 3}));
        assert!(accepts(&m, r#""ab""#));
        assert!(accepts(&m, r#""\u00e9\n中""#));
        assert!(!accepts(&m, r#""a""#));
        assert!(!accepts(&m, r#""abcd""#));
        assert!(!accepts(&m, "\"a\u{1}b\""), "raw control characters");
        assert!(!accepts(&m, r#""\ud800x""#), "lone surrogate escapes");
        let mut bad = m.clone();
        assert!(!bad.advance(&[b'"', 0xc3, 0x28]), "broken UTF-8");
    }

    #[test]
    fn numbers_anyof_refs_and_literals() {
        let m = matcher(
            json!({"anyOf": [{"type": "number"}, {"type": "null"}, {"const": {"k": [1, true]}}]}),
        );
        for ok in ["-0.5e+10", "12", "null", r#"{"k":[1,true]}"#] {
            assert!(accepts(&m, ok), "{ok}");
        }
        for bad in ["01", "1.", "-", "nul", r#"{"k":[1]}"#, "1e123"] {
            assert!(!accepts(&m, bad), "{bad}");
        }
        let tree = matcher(json!({"$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v"]}}, "$ref": "#/$defs/node"}));
        assert!(accepts(
            &tree,
            r#"{"v":1,"kids":[{"v":2},{"v":3,"kids":[]}]}"#
        ));
        assert!(!accepts(&tree, r#"{"v":1,"kids":[{}]}"#));
        let e = matcher(json!({"enum": [1, 12, "a"]}));
        assert!(accepts(&e, "1") && accepts(&e, "12") && accepts(&e, "\"a\""));
        assert!(!accepts(&e, "2") && !accepts(&e, "123"));
    }

    #[test]
    fn tool_calls_forced_and_after_text() {
        let tools = [
            ToolSchema {
                name: "get_weather".into(),
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                ),
                strict: true,
            },
            ToolSchema {
                name: "now".into(),
                parameters: None,
                strict: false,
            },
        ];
        let Ok(forced) = Grammar::tool_calls(&tools, false, true) else {
            panic!("tools compile")
        };
        let forced = Matcher::new(Arc::new(forced));
        assert!(accepts(&forced, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"));
        assert!(accepts(&forced, "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>\n<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>"));
        assert!(
            !accepts(&forced, "Sure! <tool_call>"),
            "no text when forced"
        );
        assert!(
            !accepts(
                &forced,
                "<tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call>"
            ),
            "city required"
        );
        assert!(!accepts(
            &forced,
            "<tool_call>{\"name\":\"nope\",\"arguments\":{}}</tool_call>"
        ));
        assert!(!accepts(&forced, ""), "a call is required");
        let Ok(auto) = Grammar::tool_calls(&tools, true, false) else {
            panic!("tools compile")
        };
        let auto = Matcher::new(Arc::new(auto));
        assert!(accepts(&auto, "It is sunny < 30 degrees."));
        assert!(accepts(
            &auto,
            "Let me check. <tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>"
        ));
        assert!(
            !accepts(&auto, "x <tool_call>{\"name\":"),
            "a started call must finish"
        );
        assert!(
            !accepts(
                &auto,
                "<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>\n<tool_call>"
            ),
            "one call only"
        );
    }

    #[test]
    fn random_outputs_always_parse_and_match() {
        let schema = json!({"type": "object", "properties": {
            "id": {"type": "integer"},
            "kind": {"enum": ["a", "b", null]},
            "score": {"type": ["number", "null"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "label": {"type": "string", "maxLength": 8}}, "required": ["label"]}, "maxItems": 3},
            "meta": {"type": "object"}},
            "required": ["id", "kind", "items"]});
        let m = matcher(schema);
        let mut rng = StdRng::seed_from_u64(7);
        let mut produced = 0;
        for _ in 0..300 {
            let Some(text) = random_output(&m, &mut rng, 0.5, 2000) else {
                continue;
            };
            produced += 1;
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            // Integers of any size, so only the written form can tell.
            let id = text.split("\"id\":").nth(1).unwrap_or("").trim_start();
            assert!(
                v["id"].is_number()
                    && !id
                        .split([',', '}'])
                        .next()
                        .unwrap_or(".")
                        .contains(['.', 'e', 'E']),
                "{text}"
            );
            assert!(
                matches!(&v["kind"], Value::Null) || v["kind"] == "a" || v["kind"] == "b",
                "{text}"
            );
            let items = v["items"].as_array().map_or(usize::MAX, Vec::len);
            assert!(items <= 3, "{text}");
            for item in v["items"].as_array().into_iter().flatten() {
                assert!(
                    item["label"]
                        .as_str()
                        .is_some_and(|l| l.chars().count() <= 8),
                    "{text}"
                );
            }
        }
        assert!(produced > 200, "only {produced} outputs ended");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Every compact serialisation of any value is accepted by the
        /// schema-less grammar, and nothing it accepts fails to parse.
        #[test]
        fn free_json_accepts_exactly_json(v in json_value(), junk in ".{0,24}") {
            let any = matcher(json!({}));
            let text = serde_json::to_string(&v).unwrap_or_default();
            prop_assert!(accepts(&any, &text), "{}", text);
            if accepts(&any, &junk) {
                prop_assert!(serde_json::from_str::<Value>(&junk).is_ok(), "{}", junk);
            }
        }
    }
}

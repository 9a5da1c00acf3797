//! The types values have as they pass between a workflow's steps: read from
//! the JSON Schema subset a workflow declares its inputs and model outputs
//! with, inferred for templates, and checked when a workflow is registered
//! (is this field there, is this a list, does this tool take a number here)
//! and, for inputs, when a run starts.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// The type of a value.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    /// Not known until the run (any JSON value).
    Any,
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array(Box<Type>),
    Object(ObjectType),
}

/// An object's fields, when they are known.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectType {
    /// `None`: any fields (a schema without `properties`).
    pub fields: Option<BTreeMap<String, Type>>,
    pub required: Vec<String>,
    /// `additionalProperties: false`: no other field may be given.
    pub closed: bool,
}

/// How deep a schema may nest.
const MAX_SCHEMA_DEPTH: usize = 16;

impl Type {
    /// An object with exactly these fields, all required.
    pub fn record(fields: &[(&str, Type)]) -> Type {
        Type::Object(ObjectType {
            fields: Some(
                fields
                    .iter()
                    .map(|(k, t)| ((*k).to_string(), t.clone()))
                    .collect(),
            ),
            required: fields.iter().map(|(k, _)| (*k).to_string()).collect(),
            closed: true,
        })
    }

    /// Reads a JSON Schema: `type` (one name), `properties`, `required`,
    /// `items` and `enum` are understood; anything else (descriptions,
    /// formats, bounds) is allowed and left to the model's grammar.
    pub fn from_schema(schema: &Value) -> Result<Type, String> {
        from_schema_at(schema, 0)
    }

    /// Whether a value of this type is only known at run time.
    pub fn is_any(&self) -> bool {
        matches!(self, Type::Any)
    }

    /// The type of a field of a value of this type: `Err` says why there is
    /// no such field.
    pub fn field(&self, name: &str) -> Result<Type, String> {
        match self {
            Type::Any => Ok(Type::Any),
            Type::Object(ObjectType { fields: None, .. }) => Ok(Type::Any),
            Type::Object(ObjectType {
                fields: Some(fields),
                ..
            }) => fields.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = fields.keys().map(String::as_str).collect();
                format!(
                    "has no field `{name}` (its fields: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }),
            other => Err(format!("is {other}, which has no fields")),
        }
    }

    /// The type of an element of a value of this type.
    pub fn element(&self) -> Result<Type, String> {
        match self {
            Type::Any => Ok(Type::Any),
            Type::Array(item) => Ok((**item).clone()),
            // Indexing an object by a computed name.
            Type::Object(_) => Ok(Type::Any),
            other => Err(format!("is {other}, which cannot be indexed")),
        }
    }

    /// Why a value of type `self` cannot go where `want` is expected, or
    /// `None` when it can (or cannot be known before the run).
    pub fn mismatch(&self, want: &Type) -> Option<String> {
        match (self, want) {
            (Type::Any, _) | (_, Type::Any) => None,
            (Type::Integer, Type::Number) => None,
            (Type::Array(have), Type::Array(want)) => {
                have.mismatch(want).map(|why| format!("an element {why}"))
            }
            (Type::Object(have), Type::Object(want)) => {
                let (Some(have_fields), Some(want_fields)) = (&have.fields, &want.fields) else {
                    return None;
                };
                for name in &want.required {
                    if !have_fields.contains_key(name) {
                        return Some(format!("lacks the required field `{name}`"));
                    }
                }
                for (name, t) in have_fields {
                    match want_fields.get(name) {
                        Some(w) => {
                            if let Some(why) = t.mismatch(w) {
                                return Some(format!("field `{name}` {why}"));
                            }
                        }
                        None if want.closed => {
                            return Some(format!("has the field `{name}`, which is not wanted"))
                        }
                        None => {}
                    }
                }
                None
            }
            (have, want) if have == want => None,
            (have, want) => Some(format!("is {have}, not {want}")),
        }
    }

    /// Why `value` is not of this type (a path into it and what is wrong),
    /// or `None`.
    pub fn check(&self, value: &Value) -> Option<String> {
        self.check_at(value, "")
    }

    fn check_at(&self, value: &Value, at: &str) -> Option<String> {
        let here = || {
            if at.is_empty() {
                "the value".to_string()
            } else {
                format!("`{at}`")
            }
        };
        let ok = match (self, value) {
            (Type::Any, _) => true,
            (Type::Null, Value::Null) => true,
            (Type::Boolean, Value::Bool(_)) => true,
            (Type::Integer, Value::Number(n)) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            (Type::Number, Value::Number(_)) => true,
            (Type::String, Value::String(_)) => true,
            (Type::Array(item), Value::Array(values)) => {
                for (i, v) in values.iter().enumerate() {
                    if let Some(why) = item.check_at(v, &format!("{at}[{i}]")) {
                        return Some(why);
                    }
                }
                true
            }
            (Type::Object(object), Value::Object(map)) => {
                for name in &object.required {
                    if !map.contains_key(name) {
                        return Some(format!("{} lacks the required field `{name}`", here()));
                    }
                }
                if let Some(fields) = &object.fields {
                    for (name, t) in fields {
                        if let Some(v) = map.get(name) {
                            let path = if at.is_empty() {
                                name.clone()
                            } else {
                                format!("{at}.{name}")
                            };
                            if let Some(why) = t.check_at(v, &path) {
                                return Some(why);
                            }
                        }
                    }
                }
                true
            }
            _ => false,
        };
        (!ok).then(|| format!("{} is {}, not {self}", here(), kind_of(value)))
    }
}

/// What kind of JSON value this is, for messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn from_schema_at(schema: &Value, depth: usize) -> Result<Type, String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!("nests deeper than {MAX_SCHEMA_DEPTH} levels"));
    }
    let Value::Object(schema) = schema else {
        return Err("a schema must be an object such as {\"type\": \"string\"}".into());
    };
    let name = match schema.get("type") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("`type` must be one type name".into()),
    };
    let name = match (name, schema.get("enum")) {
        (Some(n), _) => n,
        (None, Some(Value::Array(values))) => match values.first() {
            Some(Value::String(_)) => "string",
            Some(Value::Number(_)) => "number",
            Some(Value::Bool(_)) => "boolean",
            _ => return Ok(Type::Any),
        },
        (None, Some(_)) => return Err("`enum` must be a list".into()),
        (None, None) => return Ok(Type::Any),
    };
    Ok(match name {
        "string" => Type::String,
        "integer" => Type::Integer,
        "number" => Type::Number,
        "boolean" => Type::Boolean,
        "null" => Type::Null,
        "array" => match schema.get("items") {
            None => Type::Array(Box::new(Type::Any)),
            Some(items) => Type::Array(Box::new(
                from_schema_at(items, depth + 1).map_err(|e| format!("`items` {e}"))?,
            )),
        },
        "object" => {
            let fields = match schema.get("properties") {
                None => None,
                Some(Value::Object(props)) => {
                    let mut fields = BTreeMap::new();
                    for (k, v) in props {
                        let t = from_schema_at(v, depth + 1)
                            .map_err(|e| format!("property `{k}`: {e}"))?;
                        fields.insert(k.clone(), t);
                    }
                    Some(fields)
                }
                Some(_) => return Err("`properties` must be an object".into()),
            };
            let required = match schema.get("required") {
                None => Vec::new(),
                Some(Value::Array(names)) => names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("`required` must be a list of names")?,
                Some(_) => return Err("`required` must be a list of names".into()),
            };
            if let Some(fields) = &fields {
                if let Some(missing) = required.iter().find(|r| !fields.contains_key(*r)) {
                    return Err(format!(
                        "`required` names `{missing}`, which is not in `properties`"
                    ));
                }
            }
            let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
            Type::Object(ObjectType {
                fields,
                required,
                closed,
            })
        }
        other => return Err(format!("`type` `{other}` is not a JSON Schema type")),
    })
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Type::Any => f.write_str("any value"),
            Type::Null => f.write_str("null"),
            Type::Boolean => f.write_str("a boolean"),
            Type::Integer => f.write_str("an integer"),
            Type::Number => f.write_str("a number"),
            Type::String => f.write_str("a string"),
            Type::Array(item) => write!(f, "a list of {}", Plural(item)),
            Type::Object(ObjectType {
                fields: Some(fields),
                ..
            }) => {
                let names: Vec<&str> = fields.keys().map(String::as_str).collect();
                write!(f, "an object {{{}}}", names.join(", "))
            }
            Type::Object(_) => f.write_str("an object"),
        }
    }
}

/// "strings", "integers", ...: an element type inside "a list of".
struct Plural<'a>(&'a Type);

impl fmt::Display for Plural<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Type::Any => f.write_str("values"),
            Type::Null => f.write_str("nulls"),
            Type::Boolean => f.write_str("booleans"),
            Type::Integer => f.write_str("integers"),
            Type::Number => f.write_str("numbers"),
            Type::String => f.write_str("strings"),
            Type::Array(_) => f.write_str("lists"),
            Type::Object(_) => f.write_str("objects"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schemas_become_types() {
        let t = Type::from_schema(&json!({
            "type": "object",
            "properties": {
                "severity": {"enum": ["low", "high"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "score": {"type": "integer"},
            },
            "required": ["severity"],
        }))
        .unwrap();
        assert_eq!(t.field("severity").unwrap(), Type::String);
        assert_eq!(t.field("tags").unwrap().element().unwrap(), Type::String);
        assert!(t.field("nope").unwrap_err().contains("severity, tags"));
        assert_eq!(t.to_string(), "an object {score, severity, tags}");
        assert!(Type::from_schema(&json!({"type": "strin"})).is_err());
        assert!(
            Type::from_schema(&json!({"type": "object", "properties": {}, "required": ["x"]}))
                .unwrap_err()
                .contains("`x`")
        );
        assert_eq!(Type::from_schema(&json!({})).unwrap(), Type::Any);
    }

    #[test]
    fn values_are_checked_with_a_path() {
        let t = Type::from_schema(&json!({
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"type": "integer"}}},
            "required": ["items"],
        }))
        .unwrap();
        assert_eq!(t.check(&json!({"items": [1, 2]})), None);
        assert_eq!(
            t.check(&json!({"items": [1, "2"]})).unwrap(),
            "`items[1]` is a string, not an integer"
        );
        assert!(t.check(&json!({})).unwrap().contains("`items`"));
        assert_eq!(Type::Integer.check(&json!(2.0)), None);
        assert!(Type::Integer.check(&json!(2.5)).is_some());
    }

    #[test]
    fn mismatches_are_explained() {
        assert_eq!(Type::Integer.mismatch(&Type::Number), None);
        assert_eq!(
            Type::String.mismatch(&Type::Number).unwrap(),
            "is a string, not a number"
        );
        let want = Type::record(&[("expression", Type::String)]);
        let have = Type::record(&[("expression", Type::Integer)]);
        assert!(have.mismatch(&want).unwrap().contains("`expression`"));
        let extra = Type::record(&[("expression", Type::String), ("x", Type::Any)]);
        assert!(extra.mismatch(&want).unwrap().contains("`x`"));
        assert_eq!(Type::Any.mismatch(&want), None);
    }
}

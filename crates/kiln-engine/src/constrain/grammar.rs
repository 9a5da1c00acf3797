//! A grammar compiled from a JSON Schema: a graph of value shapes that the
//! [`super::Matcher`] walks byte by byte.
//!
//! Supported, and enforced: `type` (one or a list), `enum`, `const`,
//! `properties` with `required`, `additionalProperties` (a schema for the
//! values of an object that declares no properties), `items`, `minItems`,
//! `maxItems`, `minLength`, `maxLength`, `anyOf` / `oneOf`, and `$ref` to
//! `#`, `#/$defs/…` or `#/definitions/…` (recursion included). Annotations
//! (`title`, `description`, `default`, `examples`, `$schema`, ...) are
//! ignored. Constraint keywords the matcher cannot enforce (`pattern`,
//! `format`, `minimum`, `multipleOf`, ...) are refused when the caller asks
//! for `strict` and otherwise left unenforced; [`Grammar::unenforced`] names
//! them.
//!
//! The output form is fixed so that even a small model cannot wander off:
//! - an object's properties come in the order the schema declares them; an
//!   optional one may be left out, and no undeclared property is accepted
//!   when any are declared (what OpenAI's strict mode requires too);
//! - whitespace is at most one space after `:` and `,`;
//! - numbers have at most 20 digits before and 20 after the point and a
//!   2-digit exponent (so every number fits a double).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::error::{EngineError, Result};

pub(crate) type NodeId = u32;

/// Most nodes one schema may compile to, and the deepest nesting of
/// schemas inside schemas: a bound on what a request can make the server do.
const MAX_NODES: usize = 4096;
const MAX_DEPTH: usize = 64;
/// Most values in one `enum`.
const MAX_ENUM: usize = 1024;

/// The shape of one value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// Any JSON value.
    Any,
    /// One of these exact serialisations (compact JSON): `enum`, `const`,
    /// `true`/`false`, `null`.
    Literals(Vec<Box<[u8]>>),
    /// A string of `min..=max` characters.
    String {
        min: u32,
        max: Option<u32>,
    },
    Number {
        integer: bool,
    },
    Array {
        items: NodeId,
        min: u32,
        max: Option<u32>,
    },
    Object(ObjectShape),
    /// Any of these shapes.
    AnyOf(Vec<NodeId>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ObjectShape {
    /// Declared properties, in order.
    pub props: Vec<Prop>,
    /// The values of free-form keys, for an object that declares no
    /// properties; `None`: no keys at all (`{}` only).
    pub extra: Option<NodeId>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prop {
    /// The key as it is written: a JSON string, quotes included.
    pub key: Box<[u8]>,
    pub value: NodeId,
    pub required: bool,
}

impl ObjectShape {
    /// Whether the object may close when its next property would be `next`.
    pub fn may_close(&self, next: usize) -> bool {
        self.props.iter().skip(next).all(|p| !p.required)
    }

    /// Candidate properties for the key after `next - 1`: the optional ones
    /// up to and including the first required one.
    pub fn candidates(&self, next: usize) -> std::ops::Range<usize> {
        let end = self
            .props
            .iter()
            .enumerate()
            .skip(next)
            .find(|(_, p)| p.required)
            .map_or(self.props.len(), |(i, _)| i + 1);
        next..end
    }
}

/// Where the output starts: one JSON value, or text and tool calls.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Start {
    Value(NodeId),
    /// Tool calls in the `<tool_call>{"name": …, "arguments": …}</tool_call>`
    /// form; `free_text`: the model may write text first (`tool_choice:
    /// auto`); `parallel`: more than one call.
    ToolCalls {
        call: NodeId,
        free_text: bool,
        parallel: bool,
    },
}

/// A compiled grammar. Immutable and shared; every matcher state refers to
/// its nodes by index.
#[derive(Debug)]
pub struct Grammar {
    pub(crate) id: u64,
    pub(crate) nodes: Vec<Node>,
    pub(crate) start: Start,
    unenforced: BTreeSet<String>,
}

static NEXT_GRAMMAR_ID: AtomicU64 = AtomicU64::new(1);

/// Nodes every grammar has, at fixed ids.
pub(crate) const ANY: NodeId = 0;
pub(crate) const ANY_OBJECT: NodeId = 1;
pub(crate) const ANY_ARRAY: NodeId = 2;
pub(crate) const ANY_STRING: NodeId = 3;
/// `true`, `false` and `null`.
pub(crate) const WORDS: NodeId = 4;

/// The text that opens and closes a tool call.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct ToolSchema {
    pub name: String,
    /// A JSON Schema for the arguments object (`None`: any object).
    pub parameters: Option<Value>,
    pub strict: bool,
}

impl Grammar {
    /// Any JSON object (`response_format: json_object`).
    pub fn json_object() -> Grammar {
        let b = Builder::new();
        b.finish(Start::Value(ANY_OBJECT))
    }

    /// A value that matches `schema`. With `strict`, a keyword the grammar
    /// cannot enforce is an error instead of being left unenforced.
    pub fn json_schema(schema: &Value, strict: bool) -> Result<Grammar> {
        let mut b = Builder::new();
        let root = b.compile_root(schema, strict, "schema")?;
        Ok(b.finish(Start::Value(root)))
    }

    /// Calls of `tools`: forced (`free_text == false`, `tool_choice:
    /// required` or a named function) or after optional text (`auto`).
    pub fn tool_calls(tools: &[ToolSchema], free_text: bool, parallel: bool) -> Result<Grammar> {
        if tools.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a tool call needs at least one tool".into(),
            ));
        }
        let mut b = Builder::new();
        let mut calls = Vec::with_capacity(tools.len());
        for (i, tool) in tools.iter().enumerate() {
            let what = format!("tools[{i}] (`{}`) parameters", tool.name);
            let arguments = match &tool.parameters {
                Some(schema) => b.compile_root(schema, tool.strict, &what)?,
                None => ANY_OBJECT,
            };
            let name = serde_json::to_vec(&Value::String(tool.name.clone()))
                .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
            let name = b.push(Node::Literals(vec![name.into_boxed_slice()]))?;
            calls.push(b.push(Node::Object(ObjectShape {
                props: vec![
                    Prop {
                        key: b"\"name\"".to_vec().into_boxed_slice(),
                        value: name,
                        required: true,
                    },
                    Prop {
                        key: b"\"arguments\"".to_vec().into_boxed_slice(),
                        value: arguments,
                        required: true,
                    },
                ],
                extra: None,
            }))?);
        }
        let call = if calls.len() == 1 {
            calls[0]
        } else {
            b.push(Node::AnyOf(calls))?
        };
        Ok(b.finish(Start::ToolCalls {
            call,
            free_text,
            parallel,
        }))
    }

    /// Keywords of the schema that were left unenforced (non-strict only),
    /// e.g. `pattern`.
    pub fn unenforced(&self) -> impl Iterator<Item = &str> {
        self.unenforced.iter().map(String::as_str)
    }

    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }
}

/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "example",
    "$schema",
    "$id",
    "$comment",
    "readOnly",
    "writeOnly",
    "deprecated",
    "$defs",
    "definitions",
    "strict",
    "name",
];

/// Keywords the grammar reads.
const ENFORCED: &[&str] = &[
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "anyOf",
    "oneOf",
    "$ref",
    "nullable",
];

struct Builder {
    nodes: Vec<Node>,
    /// `$ref` targets already compiled (or being compiled) in this schema.
    refs: HashMap<String, NodeId>,
    unenforced: BTreeSet<String>,
}

struct Ctx<'a> {
    root: &'a Value,
    strict: bool,
    what: &'a str,
}

impl Builder {
    fn new() -> Builder {
        let mut b = Builder {
            nodes: Vec::new(),
            refs: HashMap::new(),
            unenforced: BTreeSet::new(),
        };
        b.nodes.push(Node::Any);
        b.nodes.push(Node::Object(ObjectShape {
            props: Vec::new(),
            extra: Some(ANY),
        }));
        b.nodes.push(Node::Array {
            items: ANY,
            min: 0,
            max: None,
        });
        b.nodes.push(Node::String { min: 0, max: None });
        b.nodes.push(Node::Literals(vec![
            b"true".to_vec().into_boxed_slice(),
            b"false".to_vec().into_boxed_slice(),
            b"null".to_vec().into_boxed_slice(),
        ]));
        b
    }

    fn finish(self, start: Start) -> Grammar {
        Grammar {
            id: NEXT_GRAMMAR_ID.fetch_add(1, Ordering::Relaxed),
            nodes: self.nodes,
            start,
            unenforced: self.unenforced,
        }
    }

    fn push(&mut self, node: Node) -> Result<NodeId> {
        if self.nodes.len() >= MAX_NODES {
            return Err(EngineError::InvalidRequest(format!(
                "the schema is too large: it compiles to more than {MAX_NODES} parts"
            )));
        }
        self.nodes.push(node);
        Ok((self.nodes.len() - 1) as NodeId)
    }

    fn compile_root(&mut self, schema: &Value, strict: bool, what: &str) -> Result<NodeId> {
        self.refs.clear();
        let ctx = Ctx {
            root: schema,
            strict,
            what,
        };
        // `#` refers to this root.
        let id = self.push(Node::Any)?;
        self.refs.insert("#".into(), id);
        let node = self.compile(&ctx, schema, "", 0)?;
        self.nodes[id as usize] = self.nodes[node as usize].clone();
        Ok(id)
    }

    fn error(ctx: &Ctx<'_>, path: &str, msg: impl std::fmt::Display) -> EngineError {
        let at = if path.is_empty() { "/" } else { path };
        EngineError::InvalidRequest(format!("{} at `{at}`: {msg}", ctx.what))
    }

    fn compile(
        &mut self,
        ctx: &Ctx<'_>,
        schema: &Value,
        path: &str,
        depth: usize,
    ) -> Result<NodeId> {
        if depth > MAX_DEPTH {
            return Err(Self::error(
                ctx,
                path,
                format!("schemas are nested more than {MAX_DEPTH} deep"),
            ));
        }
        let obj = match schema {
            Value::Bool(true) => return Ok(ANY),
            Value::Bool(false) => {
                return Err(Self::error(ctx, path, "the schema `false` allows no value"))
            }
            Value::Object(obj) => obj,
            _ => {
                return Err(Self::error(
                    ctx,
                    path,
                    "a schema must be an object or a boolean",
                ))
            }
        };
        for key in obj.keys() {
            if !ANNOTATIONS.contains(&key.as_str()) && !ENFORCED.contains(&key.as_str()) {
                if ctx.strict {
                    return Err(Self::error(
                        ctx,
                        path,
                        format!("the keyword `{key}` cannot be enforced; leave it out or set `strict` to false"),
                    ));
                }
                self.unenforced.insert(key.clone());
            }
        }
        if let Some(r) = obj.get("$ref") {
            let Some(r) = r.as_str() else {
                return Err(Self::error(ctx, path, "`$ref` must be a string"));
            };
            return self.reference(ctx, r, path, depth);
        }
        if let Some(c) = obj.get("const") {
            return self.literals(ctx, std::slice::from_ref(c), path);
        }
        if let Some(e) = obj.get("enum") {
            let Some(values) = e.as_array() else {
                return Err(Self::error(ctx, path, "`enum` must be an array"));
            };
            return self.literals(ctx, values, path);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key) {
                let Some(alts) = alts.as_array().filter(|a| !a.is_empty()) else {
                    return Err(Self::error(
                        ctx,
                        path,
                        format!("`{key}` must be a non-empty array"),
                    ));
                };
                let mut ids = Vec::with_capacity(alts.len());
                for (i, alt) in alts.iter().enumerate() {
                    ids.push(self.compile(ctx, alt, &format!("{path}/{key}/{i}"), depth + 1)?);
                }
                return self.push(Node::AnyOf(ids));
            }
        }
        let mut types: Vec<&str> = match obj.get("type") {
            None => Vec::new(),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => {
                let mut out = Vec::new();
                for t in ts {
                    let Some(t) = t.as_str() else {
                        return Err(Self::error(
                            ctx,
                            path,
                            "`type` must be a string or a list of strings",
                        ));
                    };
                    out.push(t);
                }
                out
            }
            Some(_) => {
                return Err(Self::error(
                    ctx,
                    path,
                    "`type` must be a string or a list of strings",
                ))
            }
        };
        if obj.get("nullable") == Some(&Value::Bool(true)) && !types.contains(&"null") {
            types.push("null");
        }
        if types.is_empty() {
            // No type: infer from the keywords present, else anything.
            if obj.contains_key("properties") || obj.contains_key("additionalProperties") {
                types.push("object");
            } else if obj.contains_key("items") {
                types.push("array");
            } else {
                return Ok(ANY);
            }
        }
        let mut ids = Vec::with_capacity(types.len());
        for t in types {
            ids.push(self.typed(ctx, obj, t, path, depth)?);
        }
        if ids.len() == 1 {
            Ok(ids[0])
        } else {
            self.push(Node::AnyOf(ids))
        }
    }

    fn typed(
        &mut self,
        ctx: &Ctx<'_>,
        obj: &serde_json::Map<String, Value>,
        ty: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId> {
        let count = |key: &str| -> Result<Option<u32>> {
            match obj.get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| {
                        Self::error(ctx, path, format!("`{key}` must be a non-negative integer"))
                    }),
            }
        };
        match ty {
            "null" => self.push(Node::Literals(vec![b"null".to_vec().into_boxed_slice()])),
            "boolean" => self.push(Node::Literals(vec![
                b"true".to_vec().into_boxed_slice(),
                b"false".to_vec().into_boxed_slice(),
            ])),
            "integer" | "number" => self.push(Node::Number {
                integer: ty == "integer",
            }),
            "string" => {
                let min = count("minLength")?.unwrap_or(0);
                let max = count("maxLength")?;
                if max.is_some_and(|m| m < min) {
                    return Err(Self::error(ctx, path, "`maxLength` is less than `minLength`"));
                }
                if min == 0 && max.is_none() {
                    return Ok(ANY_STRING);
                }
                self.push(Node::String { min, max })
            }
            "array" => {
                let min = count("minItems")?.unwrap_or(0);
                let max = count("maxItems")?;
                if max.is_some_and(|m| m < min) {
                    return Err(Self::error(ctx, path, "`maxItems` is less than `minItems`"));
                }
                let items = match obj.get("items") {
                    None => ANY,
                    Some(s) => self.compile(ctx, s, &format!("{path}/items"), depth + 1)?,
                };
                self.push(Node::Array { items, min, max })
            }
            "object" => self.object(ctx, obj, path, depth),
            other => Err(Self::error(
                ctx,
                path,
                format!("unknown type `{other}`; the types are object, array, string, number, integer, boolean and null"),
            )),
        }
    }

    fn object(
        &mut self,
        ctx: &Ctx<'_>,
        obj: &serde_json::Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId> {
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
            Some(_) => return Err(Self::error(ctx, path, "`required` must be a list of names")),
        };
        let props = match obj.get("properties") {
            None => serde_json::Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(Self::error(ctx, path, "`properties` must be an object")),
        };
        for r in &required {
            if !props.contains_key(*r) {
                return Err(Self::error(
                    ctx,
                    path,
                    format!("`{r}` is required but not among the `properties`"),
                ));
            }
        }
        if props.is_empty() {
            let extra = match obj.get("additionalProperties") {
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(Value::Bool(false)) => None,
                Some(s) => Some(self.compile(
                    ctx,
                    s,
                    &format!("{path}/additionalProperties"),
                    depth + 1,
                )?),
            };
            if extra == Some(ANY) {
                return Ok(ANY_OBJECT);
            }
            return self.push(Node::Object(ObjectShape {
                props: Vec::new(),
                extra,
            }));
        }
        let mut out = Vec::with_capacity(props.len());
        for (name, schema) in &props {
            let value =
                self.compile(ctx, schema, &format!("{path}/properties/{name}"), depth + 1)?;
            let key = serde_json::to_vec(&Value::String(name.clone()))
                .map_err(|e| Self::error(ctx, path, e))?;
            out.push(Prop {
                key: key.into_boxed_slice(),
                value,
                required: required.contains(&name.as_str()),
            });
        }
        self.push(Node::Object(ObjectShape {
            props: out,
            extra: None,
        }))
    }

    fn literals(&mut self, ctx: &Ctx<'_>, values: &[Value], path: &str) -> Result<NodeId> {
        if values.is_empty() || values.len() > MAX_ENUM {
            return Err(Self::error(
                ctx,
                path,
                format!("`enum` must have between 1 and {MAX_ENUM} values"),
            ));
        }
        let mut out: Vec<Box<[u8]>> = Vec::with_capacity(values.len());
        for v in values {
            let bytes = serde_json::to_vec(v).map_err(|e| Self::error(ctx, path, e))?;
            if !out.iter().any(|o| **o == *bytes) {
                out.push(bytes.into_boxed_slice());
            }
        }
        self.push(Node::Literals(out))
    }

    fn reference(&mut self, ctx: &Ctx<'_>, r: &str, path: &str, depth: usize) -> Result<NodeId> {
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = r
            .strip_prefix("#/")
            .and_then(|p| {
                let mut at = ctx.root;
                for part in p.split('/') {
                    let part = part.replace("~1", "/").replace("~0", "~");
                    at = at.get(part.as_str())?;
                }
                Some(at)
            })
            .ok_or_else(|| {
                Self::error(
                    ctx,
                    path,
                    format!("`$ref` `{r}` does not point into this schema (only `#` and `#/…` references are followed)"),
                )
            })?;
        // Reserve the id first, so a recursive reference finds it.
        let id = self.push(Node::Any)?;
        self.refs.insert(r.to_string(), id);
        let node = self.compile(ctx, target, r, depth + 1)?;
        self.nodes[id as usize] = self.nodes[node as usize].clone();
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_refuses_what_it_cannot_enforce_and_lax_lists_it() {
        let schema = json!({"type": "string", "pattern": "^a+$", "description": "x"});
        let err = Grammar::json_schema(&schema, true);
        assert!(matches!(err, Err(EngineError::InvalidRequest(m)) if m.contains("pattern")));
        let Ok(g) = Grammar::json_schema(&schema, false) else {
            panic!("lax schema should compile")
        };
        assert_eq!(g.unenforced().collect::<Vec<_>>(), vec!["pattern"]);
    }

    #[test]
    fn errors_point_at_the_place_in_the_schema() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "strin"}}});
        let err = Grammar::json_schema(&schema, false)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|m| m.contains("/properties/a") && m.contains("strin")),
            "{err:?}"
        );
        let missing = json!({"type": "object", "properties": {"a": {}}, "required": ["b"]});
        assert!(Grammar::json_schema(&missing, false).is_err());
        let dangling = json!({"$ref": "#/$defs/nope"});
        assert!(Grammar::json_schema(&dangling, false).is_err());
    }

    #[test]
    fn self_reference_compiles_without_looping() {
        let schema = json!({"type": "object", "properties": {
            "name": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}}}, "required": ["name"]});
        assert!(Grammar::json_schema(&schema, true).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut schema = json!({"type": "string"});
        for _ in 0..100 {
            schema = json!({"type": "array", "items": schema});
        }
        assert!(Grammar::json_schema(&schema, false).is_err());
    }
}

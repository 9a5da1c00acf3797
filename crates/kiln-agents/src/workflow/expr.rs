//! The small expression language of workflow templates and conditions.
//!
//! A template is text with `{{ expression }}` holes. A template that is
//! one hole and nothing else (`"{{ steps.classify.output }}"`) keeps the
//! value's JSON type, so lists and objects pass between steps as they are;
//! any other template is text, each hole written out (strings as they are,
//! null as nothing, everything else as JSON).
//!
//! Expressions:
//! - paths from the roots `inputs`, `steps`, `item` and `index`:
//!   `inputs.ticket`, `steps.classify.output.severity`, `item.tags[0]`;
//! - literals: `'text'` or `"text"`, numbers, `true`, `false`, `null`,
//!   lists `[a, b]`;
//! - `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `and`, `or`, `not`, parentheses;
//! - functions: `length(x)`, `coalesce(a, b, ...)` (the first that is not
//!   null: a skipped step's output is null), `lower(s)`, `upper(s)`,
//!   `trim(s)`, `contains(list_or_text, x)`, `join(list, separator)`,
//!   `json(x)` (as JSON text) and `parse_json(text)`.
//!
//! Every expression is type-checked when the workflow is registered
//! ([`Expr::type_of`]); evaluation ([`Expr::eval`]) never panics and says
//! what went wrong.

use std::collections::BTreeMap;

use serde_json::Value;

use super::types::{kind_of, Type};

/// Longest expression text.
const MAX_EXPR_LEN: usize = 4096;
/// Deepest nesting of an expression.
const MAX_DEPTH: usize = 32;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    List(Vec<Expr>),
    /// A root name and the fields and indexes after it.
    Path(String, Vec<Segment>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Cmp, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Field(String),
    Index(Expr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Length,
    Coalesce,
    Lower,
    Upper,
    Trim,
    Contains,
    Join,
    Json,
    ParseJson,
}

impl Func {
    fn by_name(name: &str) -> Option<Func> {
        Some(match name {
            "length" => Func::Length,
            "coalesce" => Func::Coalesce,
            "lower" => Func::Lower,
            "upper" => Func::Upper,
            "trim" => Func::Trim,
            "contains" => Func::Contains,
            "join" => Func::Join,
            "json" => Func::Json,
            "parse_json" => Func::ParseJson,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Func::Length => "length",
            Func::Coalesce => "coalesce",
            Func::Lower => "lower",
            Func::Upper => "upper",
            Func::Trim => "trim",
            Func::Contains => "contains",
            Func::Join => "join",
            Func::Json => "json",
            Func::ParseJson => "parse_json",
        }
    }

    /// How many arguments it takes: at least, at most.
    fn arity(self) -> (usize, usize) {
        match self {
            Func::Coalesce => (1, 16),
            Func::Contains | Func::Join => (2, 2),
            _ => (1, 1),
        }
    }
}

/// The types of the roots an expression may name, when it is checked.
pub struct Scope<'a> {
    pub inputs: &'a Type,
    /// The output type of each step the expression may name.
    pub steps: &'a BTreeMap<String, Type>,
    /// Inside a map: the type of `item` (`index` is an integer).
    pub item: Option<&'a Type>,
}

/// The values of the roots, when it is evaluated.
pub struct Env<'a> {
    pub inputs: &'a Value,
    /// Each finished step's output (null for a skipped one).
    pub steps: &'a BTreeMap<String, Value>,
    /// Inside a map: the item and its index.
    pub item: Option<(&'a Value, usize)>,
}

// ---------------------------------------------------------------- parsing

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Str(String),
    Num(Value),
    Op(&'static str),
}

fn tokens(text: &str) -> Result<Vec<Token>, String> {
    if text.len() > MAX_EXPR_LEN {
        return Err(format!("is longer than {MAX_EXPR_LEN} characters"));
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Name(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || chars[i] == '.'
                    || chars[i] == 'e'
                    || chars[i] == 'E'
                    || ((chars[i] == '-' || chars[i] == '+') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let value = match text.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => text
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| format!("`{text}` is not a number"))?,
            };
            out.push(Token::Num(value));
        } else if c == '\'' || c == '"' {
            let quote = c;
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("has a string that is not closed".into()),
                    Some(&q) if q == quote => break,
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(&e @ ('\\' | '\'' | '"')) => s.push(e),
                            _ => return Err("has an unknown escape in a string".into()),
                        }
                        i += 2;
                        continue;
                    }
                    Some(&ch) => s.push(ch),
                }
                i += 1;
            }
            i += 1;
            out.push(Token::Str(s));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = ["==", "!=", "<=", ">="]
                .into_iter()
                .find(|op| *op == two)
                .or_else(|| {
                    ["<", ">", "(", ")", "[", "]", ".", ","]
                        .into_iter()
                        .find(|op| op.starts_with(c))
                });
            match op {
                Some(op) => {
                    i += op.len();
                    out.push(Token::Op(op));
                }
                None => return Err(format!("has an unexpected `{c}`")),
            }
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat_op(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Token::Op(o)) if *o == op) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn eat_word(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Name(n)) if n == word) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect_op(&mut self, op: &str) -> Result<(), String> {
        if self.eat_op(op) {
            Ok(())
        } else {
            Err(format!("expects `{op}` {}", self.where_()))
        }
    }

    fn where_(&self) -> String {
        match self.peek() {
            None => "at the end".into(),
            Some(Token::Name(n)) => format!("before `{n}`"),
            Some(Token::Str(s)) => format!("before '{s}'"),
            Some(Token::Num(n)) => format!("before `{n}`"),
            Some(Token::Op(o)) => format!("before `{o}`"),
        }
    }

    fn nested<T>(&mut self, f: impl FnOnce(&mut Parser) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nests deeper than {MAX_DEPTH} levels"));
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn or(&mut self) -> Result<Expr, String> {
        self.nested(|p| {
            let mut left = p.and()?;
            while p.eat_word("or") {
                left = Expr::Or(Box::new(left), Box::new(p.and()?));
            }
            Ok(left)
        })
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.eat_word("and") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.eat_word("not") {
            return self.nested(|p| Ok(Expr::Not(Box::new(p.not()?))));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Expr, String> {
        let left = self.postfix()?;
        let cmp = [
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
        ]
        .into_iter()
        .find(|(op, _)| matches!(self.peek(), Some(Token::Op(o)) if o == op));
        if let Some((_, cmp)) = cmp {
            self.at += 1;
            return Ok(Expr::Compare(
                cmp,
                Box::new(left),
                Box::new(self.postfix()?),
            ));
        }
        if self.eat_word("in") {
            return Ok(Expr::In(Box::new(left), Box::new(self.postfix()?)));
        }
        Ok(left)
    }

    fn postfix(&mut self) -> Result<Expr, String> {
        let mut e = self.primary()?;
        loop {
            if self.eat_op(".") {
                let Some(Token::Name(field)) = self.peek().cloned() else {
                    return Err(format!("expects a field name after `.` {}", self.where_()));
                };
                self.at += 1;
                e = with_segment(e, Segment::Field(field))?;
            } else if self.eat_op("[") {
                let index = self.or()?;
                self.expect_op("]")?;
                e = with_segment(e, Segment::Index(index))?;
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some(token) = self.peek().cloned() else {
            return Err("ends where a value was expected".into());
        };
        self.at += 1;
        match token {
            Token::Str(s) => Ok(Expr::Literal(Value::String(s))),
            Token::Num(n) => Ok(Expr::Literal(n)),
            Token::Op("(") => {
                let e = self.or()?;
                self.expect_op(")")?;
                Ok(e)
            }
            Token::Op("[") => {
                let mut items = Vec::new();
                if !self.eat_op("]") {
                    loop {
                        items.push(self.or()?);
                        if self.eat_op("]") {
                            break;
                        }
                        self.expect_op(",")?;
                    }
                }
                Ok(Expr::List(items))
            }
            Token::Op(op) => Err(format!("has `{op}` where a value was expected")),
            Token::Name(name) => match name.as_str() {
                "true" => Ok(Expr::Literal(Value::Bool(true))),
                "false" => Ok(Expr::Literal(Value::Bool(false))),
                "null" => Ok(Expr::Literal(Value::Null)),
                "inputs" | "steps" | "item" | "index" => Ok(Expr::Path(name, Vec::new())),
                _ if matches!(self.peek(), Some(Token::Op("("))) => {
                    let func = Func::by_name(&name).ok_or_else(|| {
                        format!("calls `{name}`, which is not a function (the functions: length, coalesce, lower, upper, trim, contains, join, json, parse_json)")
                    })?;
                    self.at += 1;
                    let mut args = Vec::new();
                    if !self.eat_op(")") {
                        loop {
                            args.push(self.or()?);
                            if self.eat_op(")") {
                                break;
                            }
                            self.expect_op(",")?;
                        }
                    }
                    let (min, max) = func.arity();
                    if args.len() < min || args.len() > max {
                        return Err(format!(
                            "calls `{}` with {} arguments; it takes {}",
                            func.name(),
                            args.len(),
                            if min == max {
                                min.to_string()
                            } else {
                                format!("{min} to {max}")
                            }
                        ));
                    }
                    Ok(Expr::Call(func, args))
                }
                _ => Err(format!(
                    "names `{name}`; a path starts with `inputs`, `steps`, `item` or `index`"
                )),
            },
        }
    }
}

fn with_segment(e: Expr, segment: Segment) -> Result<Expr, String> {
    match e {
        Expr::Path(root, mut segments) => {
            segments.push(segment);
            Ok(Expr::Path(root, segments))
        }
        _ => Err("takes a field or an index of something that is not a path".into()),
    }
}

impl Expr {
    /// Parses an expression.
    pub fn parse(text: &str) -> Result<Expr, String> {
        let mut p = Parser {
            tokens: tokens(text)?,
            at: 0,
            depth: 0,
        };
        let e = p.or()?;
        if p.at < p.tokens.len() {
            return Err(format!("has more after the expression, {}", p.where_()));
        }
        Ok(e)
    }

    /// The steps it names (`steps.<id>`).
    pub fn steps_named(&self, out: &mut Vec<String>) {
        match self {
            Expr::Literal(_) => {}
            Expr::List(items) | Expr::Call(_, items) => {
                items.iter().for_each(|e| e.steps_named(out));
            }
            Expr::Path(root, segments) => {
                if root == "steps" {
                    if let Some(Segment::Field(id)) = segments.first() {
                        out.push(id.clone());
                    }
                }
                for s in segments {
                    if let Segment::Index(e) = s {
                        e.steps_named(out);
                    }
                }
            }
            Expr::Not(e) => e.steps_named(out),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) | Expr::In(a, b) => {
                a.steps_named(out);
                b.steps_named(out);
            }
        }
    }

    /// The type of its value, or why it cannot be evaluated.
    pub fn type_of(&self, scope: &Scope<'_>) -> Result<Type, String> {
        match self {
            Expr::Literal(v) => Ok(literal_type(v)),
            Expr::List(items) => {
                let types = items
                    .iter()
                    .map(|e| e.type_of(scope))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Type::Array(Box::new(common(&types))))
            }
            Expr::Path(root, segments) => path_type(root, segments, scope),
            Expr::Not(e) => {
                boolean(e, scope, "`not`")?;
                Ok(Type::Boolean)
            }
            Expr::And(a, b) | Expr::Or(a, b) => {
                boolean(a, scope, "`and`/`or`")?;
                boolean(b, scope, "`and`/`or`")?;
                Ok(Type::Boolean)
            }
            Expr::Compare(cmp, a, b) => {
                let (ta, tb) = (a.type_of(scope)?, b.type_of(scope)?);
                let ordered = matches!(cmp, Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge);
                let numeric = |t: &Type| matches!(t, Type::Integer | Type::Number | Type::Any);
                let textual = |t: &Type| matches!(t, Type::String | Type::Any);
                if ordered && !(numeric(&ta) && numeric(&tb) || textual(&ta) && textual(&tb)) {
                    return Err(format!(
                        "compares {ta} with {tb}; only numbers with numbers and strings with strings can be ordered"
                    ));
                }
                if !ordered && !ta.is_any() && !tb.is_any() && tb != Type::Null && ta != Type::Null
                {
                    let same = ta.mismatch(&tb).is_none() || tb.mismatch(&ta).is_none();
                    if !same {
                        return Err(format!("compares {ta} with {tb}, which are never equal"));
                    }
                }
                Ok(Type::Boolean)
            }
            Expr::In(a, b) => {
                let (ta, tb) = (a.type_of(scope)?, b.type_of(scope)?);
                match tb {
                    Type::String if !matches!(ta, Type::String | Type::Any) => Err(format!(
                        "looks for {ta} in a string; only a string can be found in a string"
                    )),
                    Type::Any | Type::String | Type::Array(_) | Type::Object(_) => {
                        Ok(Type::Boolean)
                    }
                    other => Err(format!("looks for a value in {other}")),
                }
            }
            Expr::Call(func, args) => {
                let types = args
                    .iter()
                    .map(|e| e.type_of(scope))
                    .collect::<Result<Vec<_>, _>>()?;
                call_type(*func, &types)
            }
        }
    }

    /// Its value.
    pub fn eval(&self, env: &Env<'_>) -> Result<Value, String> {
        match self {
            Expr::Literal(v) => Ok(v.clone()),
            Expr::List(items) => Ok(Value::Array(
                items
                    .iter()
                    .map(|e| e.eval(env))
                    .collect::<Result<_, _>>()?,
            )),
            Expr::Path(root, segments) => eval_path(root, segments, env),
            Expr::Not(e) => Ok(Value::Bool(!truth(&e.eval(env)?, "`not`")?)),
            Expr::And(a, b) => Ok(Value::Bool(
                truth(&a.eval(env)?, "`and`")? && truth(&b.eval(env)?, "`and`")?,
            )),
            Expr::Or(a, b) => Ok(Value::Bool(
                truth(&a.eval(env)?, "`or`")? || truth(&b.eval(env)?, "`or`")?,
            )),
            Expr::Compare(cmp, a, b) => compare(*cmp, &a.eval(env)?, &b.eval(env)?),
            Expr::In(a, b) => {
                let (needle, hay) = (a.eval(env)?, b.eval(env)?);
                Ok(Value::Bool(match (&needle, &hay) {
                    (Value::String(n), Value::String(h)) => h.contains(n.as_str()),
                    (_, Value::Array(items)) => items.iter().any(|i| equal(i, &needle)),
                    (Value::String(n), Value::Object(map)) => map.contains_key(n),
                    (_, Value::Null) => false,
                    _ => {
                        return Err(format!(
                            "`in` looks for {} in {}",
                            kind_of(&needle),
                            kind_of(&hay)
                        ))
                    }
                }))
            }
            Expr::Call(func, args) => {
                let values = args
                    .iter()
                    .map(|e| e.eval(env))
                    .collect::<Result<Vec<_>, _>>()?;
                call(*func, values)
            }
        }
    }
}

fn literal_type(v: &Value) -> Type {
    match v {
        Value::Null => Type::Null,
        Value::Bool(_) => Type::Boolean,
        Value::Number(n) if n.is_i64() || n.is_u64() => Type::Integer,
        Value::Number(_) => Type::Number,
        Value::String(_) => Type::String,
        _ => Type::Any,
    }
}

/// The type all of `types` share, else any.
fn common(types: &[Type]) -> Type {
    match types.split_first() {
        None => Type::Any,
        Some((first, rest)) if rest.iter().all(|t| t == first) => first.clone(),
        Some(_) => Type::Any,
    }
}

fn boolean(e: &Expr, scope: &Scope<'_>, what: &str) -> Result<(), String> {
    match e.type_of(scope)? {
        Type::Boolean | Type::Any => Ok(()),
        other => Err(format!("{what} needs true or false, not {other}")),
    }
}

fn path_type(root: &str, segments: &[Segment], scope: &Scope<'_>) -> Result<Type, String> {
    let shown = |n: usize| show_path(root, &segments[..n]);
    let (mut t, rest) = match root {
        "inputs" => (scope.inputs.clone(), segments),
        "index" | "item" if scope.item.is_none() => {
            return Err(format!("`{root}` is only defined inside a map's step"))
        }
        "index" => (Type::Integer, segments),
        "item" => (scope.item.cloned().unwrap_or(Type::Any), segments),
        _ => {
            let Some(Segment::Field(id)) = segments.first() else {
                return Err(
                    "`steps` must be followed by a step id, as in `steps.classify.output`".into(),
                );
            };
            let Some(t) = scope.steps.get(id) else {
                return Err(format!(
                    "`steps.{id}` names no step before this one{}",
                    known(scope.steps.keys())
                ));
            };
            match segments.get(1) {
                Some(Segment::Field(f)) if f == "output" => {}
                _ => {
                    return Err(format!(
                        "a step's value is `steps.{id}.output`, not `{}`",
                        shown(segments.len().min(2))
                    ))
                }
            }
            (t.clone(), &segments[2..])
        }
    };
    let offset = segments.len() - rest.len();
    for (i, s) in rest.iter().enumerate() {
        t = match s {
            Segment::Field(f) => t.field(f),
            Segment::Index(e) => match e.type_of(scope)? {
                Type::Integer | Type::String | Type::Any => t.element(),
                other => Err(format!("is indexed by {other}")),
            },
        }
        .map_err(|why| format!("`{}` {why}", shown(offset + i)))?;
    }
    Ok(t)
}

fn known<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (it may name: {})", names.join(", "))
    }
}

fn show_path(root: &str, segments: &[Segment]) -> String {
    let mut s = root.to_string();
    for seg in segments {
        match seg {
            Segment::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Segment::Index(_) => s.push_str("[…]"),
        }
    }
    s
}

fn call_type(func: Func, args: &[Type]) -> Result<Type, String> {
    let arg = |i: usize| args.get(i).cloned().unwrap_or(Type::Any);
    let want = |i: usize, ok: &dyn Fn(&Type) -> bool, what: &str| {
        let t = arg(i);
        if t.is_any() || ok(&t) {
            Ok(())
        } else {
            Err(format!(
                "`{}` takes {what} as argument {}, not {t}",
                func.name(),
                i + 1
            ))
        }
    };
    match func {
        Func::Length => {
            want(
                0,
                &|t| matches!(t, Type::String | Type::Array(_) | Type::Object(_)),
                "a string, list or object",
            )?;
            Ok(Type::Integer)
        }
        Func::Coalesce => Ok(common(
            &args
                .iter()
                .filter(|t| **t != Type::Null)
                .cloned()
                .collect::<Vec<_>>(),
        )),
        Func::Lower | Func::Upper | Func::Trim => {
            want(0, &|t| *t == Type::String, "a string")?;
            Ok(Type::String)
        }
        Func::Contains => {
            want(
                0,
                &|t| matches!(t, Type::String | Type::Array(_)),
                "a string or a list",
            )?;
            Ok(Type::Boolean)
        }
        Func::Join => {
            want(0, &|t| matches!(t, Type::Array(_)), "a list")?;
            want(1, &|t| *t == Type::String, "a string")?;
            Ok(Type::String)
        }
        Func::Json => Ok(Type::String),
        Func::ParseJson => {
            want(0, &|t| *t == Type::String, "a string")?;
            Ok(Type::Any)
        }
    }
}

fn eval_path(root: &str, segments: &[Segment], env: &Env<'_>) -> Result<Value, String> {
    let (mut v, rest): (Value, &[Segment]) = match root {
        "inputs" => (env.inputs.clone(), segments),
        "index" => match env.item {
            Some((_, i)) => (Value::from(i), segments),
            None => return Err("`index` is only defined inside a map's step".into()),
        },
        "item" => match env.item {
            Some((item, _)) => (item.clone(), segments),
            None => return Err("`item` is only defined inside a map's step".into()),
        },
        _ => {
            let Some(Segment::Field(id)) = segments.first() else {
                return Err("`steps` must be followed by a step id".into());
            };
            let Some(out) = env.steps.get(id) else {
                return Err(format!("step `{id}` has not run"));
            };
            (out.clone(), segments.get(2..).unwrap_or_default())
        }
    };
    for s in rest {
        v = match (s, v) {
            (Segment::Field(f), Value::Object(mut map)) => map.remove(f).unwrap_or(Value::Null),
            (Segment::Field(_), Value::Null) => Value::Null,
            (Segment::Field(f), other) => {
                return Err(format!(
                    "`.{f}` is asked of {}, which has no fields",
                    kind_of(&other)
                ))
            }
            (Segment::Index(e), value) => {
                let index = e.eval(env)?;
                match (value, &index) {
                    (Value::Array(mut items), Value::Number(n)) => {
                        let len = items.len() as i64;
                        match n.as_i64() {
                            Some(i) if i >= 0 && i < len => items.swap_remove(i as usize),
                            Some(i) if i < 0 && -i <= len => items.swap_remove((len + i) as usize),
                            _ => Value::Null,
                        }
                    }
                    (Value::Object(mut map), Value::String(k)) => {
                        map.remove(k).unwrap_or(Value::Null)
                    }
                    (Value::Null, _) => Value::Null,
                    (value, index) => {
                        return Err(format!(
                            "{} cannot be indexed by {}",
                            kind_of(&value),
                            kind_of(index)
                        ))
                    }
                }
            }
        };
    }
    Ok(v)
}

fn truth(v: &Value, what: &str) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(format!(
            "{what} needs true or false, not {}",
            kind_of(other)
        )),
    }
}

/// JSON equality, with 1 and 1.0 equal.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| equal(v, w)))
        }
        _ => a == b,
    }
}

fn compare(cmp: Cmp, a: &Value, b: &Value) -> Result<Value, String> {
    use std::cmp::Ordering;
    let order = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().partial_cmp(&y.as_f64()),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    };
    Ok(Value::Bool(match cmp {
        Cmp::Eq => equal(a, b),
        Cmp::Ne => !equal(a, b),
        _ => {
            let Some(order) = order else {
                return Err(format!("cannot order {} and {}", kind_of(a), kind_of(b)));
            };
            match cmp {
                Cmp::Lt => order == Ordering::Less,
                Cmp::Le => order != Ordering::Greater,
                Cmp::Gt => order == Ordering::Greater,
                _ => order != Ordering::Less,
            }
        }
    }))
}

fn call(func: Func, mut args: Vec<Value>) -> Result<Value, String> {
    let first = args.first().cloned().unwrap_or(Value::Null);
    let bad = |v: &Value| Err(format!("`{}` cannot take {}", func.name(), kind_of(v)));
    Ok(match func {
        Func::Length => match &first {
            Value::String(s) => Value::from(s.chars().count()),
            Value::Array(a) => Value::from(a.len()),
            Value::Object(o) => Value::from(o.len()),
            Value::Null => Value::from(0),
            v => return bad(v),
        },
        Func::Coalesce => args
            .into_iter()
            .find(|v| !v.is_null())
            .unwrap_or(Value::Null),
        Func::Lower | Func::Upper | Func::Trim => match &first {
            Value::String(s) => Value::String(match func {
                Func::Lower => s.to_lowercase(),
                Func::Upper => s.to_uppercase(),
                _ => s.trim().to_string(),
            }),
            v => return bad(v),
        },
        Func::Contains => {
            let needle = args.pop().unwrap_or(Value::Null);
            match (&first, &needle) {
                (Value::String(h), Value::String(n)) => Value::Bool(h.contains(n.as_str())),
                (Value::Array(items), n) => Value::Bool(items.iter().any(|i| equal(i, n))),
                (v, _) => return bad(v),
            }
        }
        Func::Join => {
            let sep = match args.get(1) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => return bad(v),
                None => String::new(),
            };
            match &first {
                Value::Array(items) => {
                    Value::String(items.iter().map(text).collect::<Vec<_>>().join(&sep))
                }
                v => return bad(v),
            }
        }
        Func::Json => Value::String(first.to_string()),
        Func::ParseJson => match &first {
            Value::String(s) => serde_json::from_str(s)
                .map_err(|e| format!("`parse_json` was given text that is not JSON: {e}"))?,
            v => return bad(v),
        },
    })
}

/// A value written into text: strings as they are, null as nothing,
/// anything else as JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------- templates

/// Text with `{{ expression }}` holes.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Hole(Expr),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err("has a `{{` that is not closed by `}}`".into());
            };
            let inner = &after[..close];
            let e = Expr::parse(inner).map_err(|e| format!("`{{{{{inner}}}}}` {e}"))?;
            parts.push(Part::Hole(e));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// A template that is one hole, whose value keeps its type.
    fn whole(&self) -> Option<&Expr> {
        match self.parts.as_slice() {
            [Part::Hole(e)] => Some(e),
            _ => None,
        }
    }

    pub fn steps_named(&self, out: &mut Vec<String>) {
        for p in &self.parts {
            if let Part::Hole(e) = p {
                e.steps_named(out);
            }
        }
    }

    pub fn type_of(&self, scope: &Scope<'_>) -> Result<Type, String> {
        if let Some(e) = self.whole() {
            return e.type_of(scope);
        }
        for p in &self.parts {
            if let Part::Hole(e) = p {
                e.type_of(scope)?;
            }
        }
        Ok(Type::String)
    }

    pub fn eval(&self, env: &Env<'_>) -> Result<Value, String> {
        if let Some(e) = self.whole() {
            return e.eval(env);
        }
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Hole(e) => s.push_str(&text(&e.eval(env)?)),
            }
        }
        Ok(Value::String(s))
    }

    /// Its value as text.
    pub fn render(&self, env: &Env<'_>) -> Result<String, String> {
        self.eval(env).map(|v| text(&v))
    }
}

/// A JSON value whose strings are templates (a tool's arguments, a
/// workflow's output).
#[derive(Debug, Clone, PartialEq)]
pub enum ValueTemplate {
    Literal(Value),
    Text(Template),
    List(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
}

impl ValueTemplate {
    /// Reads one; `Err` names the place inside it (`.a.b[2]`).
    pub fn parse(v: &Value) -> Result<ValueTemplate, String> {
        Self::parse_at(v, "")
    }

    fn parse_at(v: &Value, at: &str) -> Result<ValueTemplate, String> {
        Ok(match v {
            Value::String(s) if s.contains("{{") => ValueTemplate::Text(
                Template::parse(s)
                    .map_err(|e| format!("`{}` {e}", if at.is_empty() { "." } else { at }))?,
            ),
            Value::Array(items) => ValueTemplate::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| Self::parse_at(v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => ValueTemplate::Object(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), Self::parse_at(v, &format!("{at}.{k}"))?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => ValueTemplate::Literal(other.clone()),
        })
    }

    pub fn steps_named(&self, out: &mut Vec<String>) {
        match self {
            ValueTemplate::Literal(_) => {}
            ValueTemplate::Text(t) => t.steps_named(out),
            ValueTemplate::List(items) => items.iter().for_each(|i| i.steps_named(out)),
            ValueTemplate::Object(fields) => fields.iter().for_each(|(_, v)| v.steps_named(out)),
        }
    }

    pub fn type_of(&self, scope: &Scope<'_>) -> Result<Type, String> {
        Ok(match self {
            ValueTemplate::Literal(v) => value_type(v),
            ValueTemplate::Text(t) => t.type_of(scope)?,
            ValueTemplate::List(items) => Type::Array(Box::new(common(
                &items
                    .iter()
                    .map(|i| i.type_of(scope))
                    .collect::<Result<Vec<_>, _>>()?,
            ))),
            ValueTemplate::Object(fields) => {
                let mut types = BTreeMap::new();
                for (k, v) in fields {
                    types.insert(
                        k.clone(),
                        v.type_of(scope).map_err(|e| format!("`{k}`: {e}"))?,
                    );
                }
                Type::Object(super::types::ObjectType {
                    required: types.keys().cloned().collect(),
                    fields: Some(types),
                    closed: true,
                })
            }
        })
    }

    pub fn eval(&self, env: &Env<'_>) -> Result<Value, String> {
        Ok(match self {
            ValueTemplate::Literal(v) => v.clone(),
            ValueTemplate::Text(t) => t.eval(env)?,
            ValueTemplate::List(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.eval(env))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTemplate::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.eval(env)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// The type of a literal JSON value, fields included.
fn value_type(v: &Value) -> Type {
    match v {
        Value::Array(items) => Type::Array(Box::new(common(
            &items.iter().map(value_type).collect::<Vec<_>>(),
        ))),
        Value::Object(map) => Type::Object(super::types::ObjectType {
            fields: Some(
                map.iter()
                    .map(|(k, v)| (k.clone(), value_type(v)))
                    .collect(),
            ),
            required: map.keys().cloned().collect(),
            closed: true,
        }),
        other => literal_type(other),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope_types() -> (Type, BTreeMap<String, Type>) {
        let inputs = Type::from_schema(&json!({
            "type": "object",
            "properties": {"ticket": {"type": "string"}, "items": {"type": "array", "items": {"type": "integer"}}},
            "required": ["ticket"],
        }))
        .unwrap();
        let mut steps = BTreeMap::new();
        steps.insert(
            "classify".to_string(),
            Type::from_schema(&json!({
                "type": "object",
                "properties": {"severity": {"enum": ["low", "high"]}, "score": {"type": "number"}},
            }))
            .unwrap(),
        );
        steps.insert("reply".to_string(), Type::String);
        (inputs, steps)
    }

    fn type_of(text: &str) -> Result<Type, String> {
        let (inputs, steps) = scope_types();
        let scope = Scope {
            inputs: &inputs,
            steps: &steps,
            item: None,
        };
        Expr::parse(text)?.type_of(&scope)
    }

    #[test]
    fn expressions_are_typed() {
        assert_eq!(
            type_of("steps.classify.output.severity == 'high'").unwrap(),
            Type::Boolean
        );
        assert_eq!(
            type_of("length(inputs.items) > 2 and not (steps.classify.output.score < 0.5)")
                .unwrap(),
            Type::Boolean
        );
        assert_eq!(type_of("inputs.items[0]").unwrap(), Type::Integer);
        assert_eq!(
            type_of("coalesce(steps.reply.output, 'none')").unwrap(),
            Type::String
        );
        assert!(type_of("steps.classify.output.sevrity")
            .unwrap_err()
            .contains("severity"));
        assert!(type_of("steps.nope.output")
            .unwrap_err()
            .contains("classify, reply"));
        assert!(type_of("steps.reply")
            .unwrap_err()
            .contains("steps.reply.output"));
        assert!(type_of("steps.reply.output.x")
            .unwrap_err()
            .contains("a string"));
        assert!(type_of("inputs.ticket < 3")
            .unwrap_err()
            .contains("ordered"));
        assert!(type_of("inputs.ticket == 3")
            .unwrap_err()
            .contains("never equal"));
        assert!(type_of("not inputs.ticket")
            .unwrap_err()
            .contains("true or false"));
        assert!(type_of("item").unwrap_err().contains("map"));
        assert!(type_of("lenght(inputs.items)")
            .unwrap_err()
            .contains("not a function"));
        assert!(type_of("join(inputs.ticket, ',')")
            .unwrap_err()
            .contains("a list"));
        assert!(type_of("inputs.ticket ==").is_err());
        assert!(
            type_of("(((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))")
                .unwrap_err()
                .contains("deeper")
        );
    }

    #[test]
    fn expressions_evaluate() {
        let inputs = json!({"ticket": "Printer on fire", "items": [3, 1, 2]});
        let mut steps = BTreeMap::new();
        steps.insert(
            "classify".to_string(),
            json!({"severity": "high", "score": 0.9}),
        );
        steps.insert("skipped".to_string(), Value::Null);
        let env = Env {
            inputs: &inputs,
            steps: &steps,
            item: Some((&json!({"n": 4}), 1)),
        };
        let eval = |t: &str| Expr::parse(t).unwrap().eval(&env);
        assert_eq!(
            eval("steps.classify.output.severity == 'high' and item.n >= 4").unwrap(),
            json!(true)
        );
        assert_eq!(eval("inputs.items[-1]").unwrap(), json!(2));
        assert_eq!(eval("inputs.items[7]").unwrap(), Value::Null);
        assert_eq!(eval("'fire' in lower(inputs.ticket)").unwrap(), json!(true));
        assert_eq!(eval("2 in inputs.items and 5 in [5]").unwrap(), json!(true));
        assert_eq!(
            eval("coalesce(steps.skipped.output, index)").unwrap(),
            json!(1)
        );
        assert_eq!(eval("join(inputs.items, '-')").unwrap(), json!("3-1-2"));
        assert_eq!(
            eval("parse_json('[1, 2.0]') == [1, 2]").unwrap(),
            json!(true)
        );
        assert_eq!(
            eval("length(parse_json('[1, 2.0]')) == 2").unwrap(),
            json!(true)
        );
        assert!(eval("inputs.ticket.x").unwrap_err().contains("no fields"));
        assert!(eval("inputs.ticket and true")
            .unwrap_err()
            .contains("true or false"));
    }

    #[test]
    fn templates_keep_whole_values_and_write_out_the_rest() {
        let inputs = json!({"items": [1, 2], "name": "Ada"});
        let steps = BTreeMap::new();
        let env = Env {
            inputs: &inputs,
            steps: &steps,
            item: None,
        };
        let t = Template::parse("{{ inputs.items }}").unwrap();
        assert_eq!(t.eval(&env).unwrap(), json!([1, 2]));
        let t =
            Template::parse("Hi {{inputs.name}}, {{ inputs.items }}{{ inputs.none }}!").unwrap();
        assert_eq!(t.eval(&env).unwrap(), json!("Hi Ada, [1,2]!"));
        assert!(Template::parse("{{ inputs.name")
            .unwrap_err()
            .contains("not closed"));
        let v = ValueTemplate::parse(
            &json!({"expression": "{{ inputs.items[0] }} + 1", "k": [1, "{{ inputs.items[1] }}"]}),
        )
        .unwrap();
        assert_eq!(
            v.eval(&env).unwrap(),
            json!({"expression": "1 + 1", "k": [1, 2]})
        );
    }
}

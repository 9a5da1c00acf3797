//! The state of one constrained generation: which bytes may come next.
//!
//! A state is a set of alternative stacks (a grammar with `anyOf` can be
//! ambiguous for a while); each stack lists what is still open, innermost
//! last. Feeding a byte replaces every stack by the stacks it can become;
//! the byte is rejected when none is left.

use std::sync::Arc;

use super::grammar::{
    Grammar, Node, NodeId, ObjectShape, Start, ANY, ANY_ARRAY, ANY_OBJECT, ANY_STRING,
    TOOL_CALL_CLOSE, TOOL_CALL_OPEN, WORDS,
};

/// Digits allowed before and after the point, and in the exponent.
const MAX_INT_DIGITS: u8 = 20;
const MAX_FRAC_DIGITS: u8 = 20;
const MAX_EXP_DIGITS: u8 = 2;
/// Most alternative stacks kept; past this the newest are dropped (every
/// one kept is still valid, so output stays valid).
const MAX_ALTERNATIVES: usize = 64;
/// `len`/`count` in a mask key when the limit cannot matter for one token.
pub(crate) const FAR: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Frame {
    /// A value of this node starts at the next byte.
    Value(NodeId),
    /// Inside a literal (`true`, an enum value): `pos` bytes matched by the
    /// candidates in `alive` (indices into the node's literals).
    Literal {
        node: NodeId,
        pos: u16,
        alive: Vec<u16>,
    },
    /// Inside a string, after its opening quote; `len` characters so far
    /// (counted only when the node limits the length).
    Str {
        node: NodeId,
        len: u32,
        esc: Esc,
    },
    Number {
        integer: bool,
        phase: Num,
    },
    Array {
        node: NodeId,
        count: u32,
        phase: List,
    },
    /// An object; `next` is the index of the first declared property that
    /// may still come.
    Object {
        node: NodeId,
        next: u16,
        phase: Obj,
    },
    /// A declared key being written: `pos` bytes (opening quote included)
    /// matched by the properties in `alive`.
    Key {
        node: NodeId,
        pos: u16,
        alive: Vec<u16>,
    },
    /// Fixed text: `<tool_call>` or `</tool_call>`, `pos` bytes matched.
    Fixed {
        close: bool,
        pos: u8,
    },
    /// A newline may come here.
    OptNewline,
    /// Free text before any tool call; `pos` bytes of `<tool_call>` end it.
    Text {
        pos: u8,
    },
    /// After a tool call: the end, or (parallel calls) another call.
    AfterCall {
        newline: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Esc {
    Normal,
    Backslash,
    /// `\u` escape: hex digits still to come.
    Hex(u8),
    /// `\uD`: the next digit must keep it out of the surrogates.
    HexAfterD,
    /// Inside a multi-byte character: `need` bytes to come, the next in `lo..=hi`.
    Utf8 {
        need: u8,
        lo: u8,
        hi: u8,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Num {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac(u8),
    Exp,
    ExpSign,
    ExpDigits(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum List {
    Open,
    AfterItem,
    Comma { space: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Obj {
    Open,
    /// A key was written; `:` comes next.
    Colon,
    /// After `:`; the value comes next.
    Value {
        space: bool,
    },
    AfterValue,
    Comma {
        space: bool,
    },
}

pub(crate) type Stack = Vec<Frame>;

/// Where one constrained generation stands.
#[derive(Debug, Clone)]
pub struct Matcher {
    grammar: Arc<Grammar>,
    stacks: Vec<Stack>,
}

impl Matcher {
    pub fn new(grammar: Arc<Grammar>) -> Matcher {
        let stacks = vec![start_stack(&grammar)];
        Matcher { grammar, stacks }
    }

    pub fn grammar(&self) -> &Arc<Grammar> {
        &self.grammar
    }

    /// Feeds `bytes`; false (and the state unchanged) when the grammar
    /// rejects them.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut stacks = self.stacks.clone();
        for &b in bytes {
            stacks = step_all(&self.grammar, &stacks, b);
            if stacks.is_empty() {
                return false;
            }
        }
        self.stacks = stacks;
        true
    }

    /// Whether the output may end here.
    pub fn accepting(&self) -> bool {
        self.stacks
            .iter()
            .any(|s| s.iter().all(|f| eos_ok(&self.grammar, f)))
    }

    /// Whether the output must end here: it may, and no byte may follow.
    pub fn complete(&self) -> bool {
        self.accepting() && (0..=255u8).all(|b| step_all(&self.grammar, &self.stacks, b).is_empty())
    }

    /// When every alternative is inside a string, between characters: how
    /// many more characters fit (`Some(None)`: no limit).
    pub(crate) fn string_room(&self) -> Option<Option<u32>> {
        let mut room = Some(0u32);
        for s in &self.stacks {
            let Some(Frame::Str {
                node,
                len,
                esc: Esc::Normal,
            }) = s.last()
            else {
                return None;
            };
            let (_, max) = string_limits(&self.grammar, *node);
            room = match (room, max) {
                (None, _) | (_, None) => None,
                (Some(r), Some(m)) => Some(r.max(m.saturating_sub(*len))),
            };
        }
        Some(room)
    }

    pub(crate) fn stacks(&self) -> &[Stack] {
        &self.stacks
    }

    /// The state with counts that cannot matter for the next `horizon`
    /// bytes replaced by [`FAR`]: equal keys allow the same tokens.
    pub(crate) fn mask_key(&self, horizon: u32) -> Vec<Stack> {
        let g = &self.grammar;
        self.stacks
            .iter()
            .map(|s| {
                s.iter()
                    .map(|f| match *f {
                        Frame::Str { node, len, esc } => {
                            let (min, max) = string_limits(g, node);
                            let far =
                                len >= min && max.is_none_or(|m| m.saturating_sub(len) > horizon);
                            Frame::Str {
                                node,
                                len: if far { FAR } else { len },
                                esc,
                            }
                        }
                        Frame::Array { node, count, phase } => {
                            let (_, min, max) = array_shape(g, node);
                            let far = count >= min
                                && max.is_none_or(|m| m.saturating_sub(count) > horizon);
                            Frame::Array {
                                node,
                                count: if far { FAR } else { count },
                                phase,
                            }
                        }
                        ref other => other.clone(),
                    })
                    .collect()
            })
            .collect()
    }
}

fn start_stack(g: &Grammar) -> Stack {
    match g.start {
        Start::Value(root) => vec![Frame::Value(root)],
        Start::ToolCalls {
            free_text: true, ..
        } => vec![Frame::Text { pos: 0 }],
        Start::ToolCalls { call, .. } => {
            let mut s = Vec::new();
            push_call(&mut s, call, 0);
            s
        }
    }
}

/// Pushes the frames of one tool call, `open` bytes of `<tool_call>` already written.
fn push_call(s: &mut Stack, call: NodeId, open: usize) {
    s.extend([
        Frame::AfterCall { newline: false },
        Frame::Fixed {
            close: true,
            pos: 0,
        },
        Frame::OptNewline,
        Frame::Value(call),
        Frame::OptNewline,
    ]);
    if open < TOOL_CALL_OPEN.len() {
        s.push(Frame::Fixed {
            close: false,
            pos: open as u8,
        });
    }
}

/// Whether a frame lets the output end while it is open.
fn eos_ok(g: &Grammar, f: &Frame) -> bool {
    match f {
        Frame::Text { .. } | Frame::AfterCall { .. } | Frame::OptNewline => true,
        Frame::Number { phase, .. } => number_complete(*phase),
        Frame::Literal { node, pos, alive } => match g.node(*node) {
            Node::Literals(lits) => alive
                .iter()
                .any(|&i| lits[i as usize].len() == *pos as usize),
            _ => false,
        },
        _ => false,
    }
}

fn number_complete(p: Num) -> bool {
    matches!(
        p,
        Num::Zero | Num::Int(_) | Num::Frac(_) | Num::ExpDigits(_)
    )
}

pub(crate) fn step_all(g: &Grammar, stacks: &[Stack], b: u8) -> Vec<Stack> {
    let mut out = Vec::new();
    for s in stacks {
        feed(g, s.clone(), b, &mut out);
    }
    if out.len() > 1 {
        let mut unique: Vec<Stack> = Vec::with_capacity(out.len());
        for s in out {
            if !unique.contains(&s) {
                unique.push(s);
            }
        }
        unique.truncate(MAX_ALTERNATIVES);
        out = unique;
    }
    out
}

fn string_limits(g: &Grammar, node: NodeId) -> (u32, Option<u32>) {
    match g.node(node) {
        Node::String { min, max } => (*min, *max),
        _ => (0, None),
    }
}

fn array_shape(g: &Grammar, node: NodeId) -> (NodeId, u32, Option<u32>) {
    match g.node(node) {
        Node::Array { items, min, max } => (*items, *min, *max),
        _ => (ANY, 0, None),
    }
}

/// Any keys, any values: the shape of objects inside free JSON.
static FREE_OBJECT: ObjectShape = ObjectShape {
    props: Vec::new(),
    extra: Some(ANY),
};

fn object_shape(g: &Grammar, node: NodeId) -> &ObjectShape {
    match g.node(node) {
        Node::Object(shape) => shape,
        _ => &FREE_OBJECT,
    }
}

/// Feeds byte `b` to `stack`, pushing every stack it can become onto `out`.
fn feed(g: &Grammar, mut stack: Stack, b: u8, out: &mut Vec<Stack>) {
    let Some(top) = stack.pop() else {
        return; // the output is complete: nothing more fits
    };
    match top {
        Frame::Value(node) => start_value(g, stack, node, b, out),
        Frame::Literal { node, pos, alive } => {
            let Node::Literals(lits) = g.node(node) else {
                return;
            };
            let p = pos as usize;
            let ends_here = alive.iter().any(|&i| lits[i as usize].len() == p);
            let next: Vec<u16> = alive
                .iter()
                .copied()
                .filter(|&i| lits[i as usize].get(p) == Some(&b))
                .collect();
            if !next.is_empty() {
                let mut s = stack.clone();
                s.push(Frame::Literal {
                    node,
                    pos: pos + 1,
                    alive: next,
                });
                out.push(close_finished_literal(g, s));
            }
            if ends_here {
                feed(g, stack, b, out);
            }
        }
        Frame::Str { node, len, esc } => {
            if let Some(f) = string_byte(g, node, len, esc, b) {
                if let Some(f) = f {
                    stack.push(f);
                }
                out.push(stack);
            }
        }
        Frame::Number { integer, phase } => {
            if let Some(p) = number_byte(integer, phase, b) {
                stack.push(Frame::Number { integer, phase: p });
                out.push(stack);
            } else if number_complete(phase) {
                feed(g, stack, b, out);
            }
        }
        Frame::Array { node, count, phase } => array_byte(g, stack, node, count, phase, b, out),
        Frame::Object { node, next, phase } => object_byte(g, stack, node, next, phase, b, out),
        Frame::Key { node, pos, alive } => {
            let shape = object_shape(g, node);
            let p = pos as usize;
            let next: Vec<u16> = alive
                .iter()
                .copied()
                .filter(|&i| shape.props[i as usize].key.get(p) == Some(&b))
                .collect();
            // A key ends with its closing quote, so no complete key is a
            // prefix of another: at most one finishes here.
            if let Some(&done) = next
                .iter()
                .find(|&&i| shape.props[i as usize].key.len() == p + 1)
            {
                if let Some(Frame::Object { next: n, .. }) = stack.last_mut() {
                    *n = done + 1;
                }
                out.push(stack);
            } else if !next.is_empty() {
                stack.push(Frame::Key {
                    node,
                    pos: pos + 1,
                    alive: next,
                });
                out.push(stack);
            }
        }
        Frame::Fixed { close, pos } => {
            let text = if close {
                TOOL_CALL_CLOSE
            } else {
                TOOL_CALL_OPEN
            }
            .as_bytes();
            if text.get(pos as usize) == Some(&b) {
                if pos as usize + 1 < text.len() {
                    stack.push(Frame::Fixed {
                        close,
                        pos: pos + 1,
                    });
                }
                out.push(stack);
            }
        }
        Frame::OptNewline => {
            if b == b'\n' {
                out.push(stack.clone());
            }
            feed(g, stack, b, out);
        }
        Frame::Text { pos } => {
            let trigger = TOOL_CALL_OPEN.as_bytes();
            if trigger[pos as usize] == b {
                if pos as usize + 1 == trigger.len() {
                    if let Start::ToolCalls { call, .. } = g.start {
                        push_call(&mut stack, call, trigger.len());
                    }
                } else {
                    stack.push(Frame::Text { pos: pos + 1 });
                }
            } else {
                // `<` occurs only at the trigger's start, so a mismatch
                // restarts the match at this byte.
                let pos = u8::from(b == trigger[0]);
                stack.push(Frame::Text { pos });
            }
            out.push(stack);
        }
        Frame::AfterCall { newline } => {
            let Start::ToolCalls { call, parallel, .. } = g.start else {
                return;
            };
            if !parallel {
                return;
            }
            if b == b'\n' && !newline {
                stack.push(Frame::AfterCall { newline: true });
                out.push(stack);
            } else if b == TOOL_CALL_OPEN.as_bytes()[0] {
                push_call(&mut stack, call, 1);
                out.push(stack);
            }
        }
    }
}

/// A literal that every remaining candidate has finished is popped at once.
fn close_finished_literal(g: &Grammar, mut s: Stack) -> Stack {
    if let Some(Frame::Literal { node, pos, alive }) = s.last() {
        if let Node::Literals(lits) = g.node(*node) {
            if alive
                .iter()
                .all(|&i| lits[i as usize].len() == *pos as usize)
            {
                s.pop();
            }
        }
    }
    s
}

fn start_value(g: &Grammar, mut stack: Stack, node: NodeId, b: u8, out: &mut Vec<Stack>) {
    match g.node(node) {
        Node::Any => match b {
            b'{' => {
                stack.push(Frame::Object {
                    node: ANY_OBJECT,
                    next: 0,
                    phase: Obj::Open,
                });
                out.push(stack);
            }
            b'[' => {
                stack.push(Frame::Array {
                    node: ANY_ARRAY,
                    count: 0,
                    phase: List::Open,
                });
                out.push(stack);
            }
            b'"' => {
                stack.push(Frame::Str {
                    node: ANY_STRING,
                    len: 0,
                    esc: Esc::Normal,
                });
                out.push(stack);
            }
            b'-' | b'0'..=b'9' => start_number(stack, false, b, out),
            b't' | b'f' | b'n' => start_value(g, stack, WORDS, b, out),
            _ => {}
        },
        Node::Literals(lits) => {
            let alive: Vec<u16> = (0..lits.len() as u16)
                .filter(|&i| lits[i as usize].first() == Some(&b))
                .collect();
            if !alive.is_empty() {
                stack.push(Frame::Literal {
                    node,
                    pos: 1,
                    alive,
                });
                out.push(close_finished_literal(g, stack));
            }
        }
        Node::String { .. } => {
            if b == b'"' {
                stack.push(Frame::Str {
                    node,
                    len: 0,
                    esc: Esc::Normal,
                });
                out.push(stack);
            }
        }
        Node::Number { integer } => {
            if b == b'-' || b.is_ascii_digit() {
                start_number(stack, *integer, b, out);
            }
        }
        Node::Array { .. } => {
            if b == b'[' {
                stack.push(Frame::Array {
                    node,
                    count: 0,
                    phase: List::Open,
                });
                out.push(stack);
            }
        }
        Node::Object(_) => {
            if b == b'{' {
                stack.push(Frame::Object {
                    node,
                    next: 0,
                    phase: Obj::Open,
                });
                out.push(stack);
            }
        }
        Node::AnyOf(alts) => {
            for &alt in alts {
                start_value(g, stack.clone(), alt, b, out);
            }
        }
    }
}

fn start_number(mut stack: Stack, integer: bool, b: u8, out: &mut Vec<Stack>) {
    let phase = match b {
        b'-' => Num::Minus,
        b'0' => Num::Zero,
        b'1'..=b'9' => Num::Int(1),
        _ => return,
    };
    stack.push(Frame::Number { integer, phase });
    out.push(stack);
}

fn number_byte(integer: bool, phase: Num, b: u8) -> Option<Num> {
    let digit = b.is_ascii_digit();
    let exp = !integer && (b == b'e' || b == b'E');
    match phase {
        Num::Minus => match b {
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int(1)),
            _ => None,
        },
        Num::Zero | Num::Int(_) if !integer && b == b'.' => Some(Num::Dot),
        Num::Zero | Num::Int(_) | Num::Frac(_) if exp => Some(Num::Exp),
        Num::Int(d) if digit && d < MAX_INT_DIGITS => Some(Num::Int(d + 1)),
        Num::Dot if digit => Some(Num::Frac(1)),
        Num::Frac(d) if digit && d < MAX_FRAC_DIGITS => Some(Num::Frac(d + 1)),
        Num::Exp if b == b'+' || b == b'-' => Some(Num::ExpSign),
        Num::Exp | Num::ExpSign if digit => Some(Num::ExpDigits(1)),
        Num::ExpDigits(d) if digit && d < MAX_EXP_DIGITS => Some(Num::ExpDigits(d + 1)),
        _ => None,
    }
}

/// The string frame after byte `b`: `Some(Some(frame))` still open,
/// `Some(None)` closed, `None` rejected.
fn string_byte(g: &Grammar, node: NodeId, len: u32, esc: Esc, b: u8) -> Option<Option<Frame>> {
    let (min, max) = string_limits(g, node);
    let counted = min > 0 || max.is_some();
    let room = max.is_none_or(|m| len < m);
    let bump = if counted { len + 1 } else { len };
    let open = |len: u32, esc: Esc| Some(Some(Frame::Str { node, len, esc }));
    match esc {
        Esc::Normal => match b {
            b'"' if len >= min || !counted => Some(None),
            b'"' => None,
            b'\\' if room => open(bump, Esc::Backslash),
            0x00..=0x1f => None,
            0x20..=0x7f if room => open(bump, Esc::Normal),
            0xc2..=0xdf if room => open(
                bump,
                Esc::Utf8 {
                    need: 1,
                    lo: 0x80,
                    hi: 0xbf,
                },
            ),
            0xe0 if room => open(
                bump,
                Esc::Utf8 {
                    need: 2,
                    lo: 0xa0,
                    hi: 0xbf,
                },
            ),
            0xed if room => open(
                bump,
                Esc::Utf8 {
                    need: 2,
                    lo: 0x80,
                    hi: 0x9f,
                },
            ),
            0xe1..=0xef if room => open(
                bump,
                Esc::Utf8 {
                    need: 2,
                    lo: 0x80,
                    hi: 0xbf,
                },
            ),
            0xf0 if room => open(
                bump,
                Esc::Utf8 {
                    need: 3,
                    lo: 0x90,
                    hi: 0xbf,
                },
            ),
            0xf1..=0xf3 if room => open(
                bump,
                Esc::Utf8 {
                    need: 3,
                    lo: 0x80,
                    hi: 0xbf,
                },
            ),
            0xf4 if room => open(
                bump,
                Esc::Utf8 {
                    need: 3,
                    lo: 0x80,
                    hi: 0x8f,
                },
            ),
            _ => None,
        },
        Esc::Utf8 { need, lo, hi } => {
            if !(lo..=hi).contains(&b) {
                return None;
            }
            if need == 1 {
                open(len, Esc::Normal)
            } else {
                open(
                    len,
                    Esc::Utf8 {
                        need: need - 1,
                        lo: 0x80,
                        hi: 0xbf,
                    },
                )
            }
        }
        Esc::Backslash => match b {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => open(len, Esc::Normal),
            b'u' => open(len, Esc::Hex(4)),
            _ => None,
        },
        Esc::Hex(4) if b == b'd' || b == b'D' => open(len, Esc::HexAfterD),
        Esc::HexAfterD => match b {
            b'0'..=b'7' => open(len, Esc::Hex(2)),
            _ => None,
        },
        Esc::Hex(n) => {
            if !b.is_ascii_hexdigit() {
                return None;
            }
            if n == 1 {
                open(len, Esc::Normal)
            } else {
                open(len, Esc::Hex(n - 1))
            }
        }
    }
}

fn array_byte(
    g: &Grammar,
    mut stack: Stack,
    node: NodeId,
    count: u32,
    phase: List,
    b: u8,
    out: &mut Vec<Stack>,
) {
    let (items, min, max) = array_shape(g, node);
    let counted = min > 0 || max.is_some();
    let room = max.is_none_or(|m| count < m);
    let item = |mut stack: Stack, out: &mut Vec<Stack>| {
        if !room {
            return;
        }
        stack.push(Frame::Array {
            node,
            count: if counted { count + 1 } else { count },
            phase: List::AfterItem,
        });
        stack.push(Frame::Value(items));
        feed(g, stack, b, out);
    };
    match phase {
        List::Open => {
            if b == b']' {
                if min == 0 {
                    out.push(stack);
                }
            } else {
                item(stack, out);
            }
        }
        List::AfterItem => match b {
            b',' if room => {
                stack.push(Frame::Array {
                    node,
                    count,
                    phase: List::Comma { space: false },
                });
                out.push(stack);
            }
            b']' if count >= min || !counted => out.push(stack),
            _ => {}
        },
        List::Comma { space } => {
            if b == b' ' && !space {
                stack.push(Frame::Array {
                    node,
                    count,
                    phase: List::Comma { space: true },
                });
                out.push(stack);
            } else {
                item(stack, out);
            }
        }
    }
}

fn object_byte(
    g: &Grammar,
    mut stack: Stack,
    node: NodeId,
    next: u16,
    phase: Obj,
    b: u8,
    out: &mut Vec<Stack>,
) {
    let shape = object_shape(g, node);
    let again = |phase: Obj| Frame::Object { node, next, phase };
    let start_key = |mut stack: Stack, out: &mut Vec<Stack>| {
        if shape.props.is_empty() {
            if shape.extra.is_some() {
                stack.push(again(Obj::Colon));
                stack.push(Frame::Str {
                    node: ANY_STRING,
                    len: 0,
                    esc: Esc::Normal,
                });
                out.push(stack);
            }
            return;
        }
        let alive: Vec<u16> = shape.candidates(next as usize).map(|i| i as u16).collect();
        if !alive.is_empty() {
            stack.push(again(Obj::Colon));
            stack.push(Frame::Key {
                node,
                pos: 1,
                alive,
            });
            out.push(stack);
        }
    };
    match phase {
        Obj::Open => match b {
            b'}' if shape.may_close(next as usize) => out.push(stack),
            b'"' => start_key(stack, out),
            _ => {}
        },
        Obj::Colon => {
            if b == b':' {
                stack.push(again(Obj::Value { space: false }));
                out.push(stack);
            }
        }
        Obj::Value { space } => {
            if b == b' ' && !space {
                stack.push(again(Obj::Value { space: true }));
                out.push(stack);
                return;
            }
            let value = if shape.props.is_empty() {
                shape.extra.unwrap_or(ANY)
            } else {
                match shape.props.get((next as usize).wrapping_sub(1)) {
                    Some(p) => p.value,
                    None => return,
                }
            };
            stack.push(again(Obj::AfterValue));
            stack.push(Frame::Value(value));
            feed(g, stack, b, out);
        }
        Obj::AfterValue => match b {
            b',' => {
                let more = if shape.props.is_empty() {
                    true
                } else {
                    !shape.candidates(next as usize).is_empty()
                };
                if more {
                    stack.push(again(Obj::Comma { space: false }));
                    out.push(stack);
                }
            }
            b'}' if shape.may_close(next as usize) => out.push(stack),
            _ => {}
        },
        Obj::Comma { space } => match b {
            b' ' if !space => {
                stack.push(again(Obj::Comma { space: true }));
                out.push(stack);
            }
            b'"' => start_key(stack, out),
            _ => {}
        },
    }
}

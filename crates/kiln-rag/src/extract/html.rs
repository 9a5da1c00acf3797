//! HTML to the shared Markdown-style shape, by a tolerant scanner rather than
//! a DOM: headings, paragraphs, lists and tables are kept, scripts, styles
//! and `<head>` dropped, character references decoded. Malformed markup is
//! read tolerantly, never refused.

use std::borrow::Cow;

use super::{clean_title, find, Break, ExtractError, MdWriter};

/// HTML tables nested deeper than this are read as plain content.
const MAX_HTML_TABLE_DEPTH: usize = 64;

/// Elements that start and end a paragraph.
const HTML_BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "nav",
    "aside",
    "blockquote",
    "figure",
    "figcaption",
    "address",
    "hr",
    "form",
    "fieldset",
    "legend",
    "details",
    "summary",
    "caption",
    "center",
    "dialog",
    "hgroup",
    "body",
    "html",
    "noframes",
    "frameset",
    "search",
];
/// Elements whose content is dropped whole.
const HTML_SKIPPED: &[&str] = &[
    "script", "style", "noscript", "template", "svg", "math", "object",
];
/// Elements that may appear in `<head>`; any other closes it.
const HTML_HEAD_ONLY: &[&str] = &[
    "meta", "link", "base", "title", "style", "script", "noscript",
];

pub(super) fn html_to_text(
    html: &str,
    limit: usize,
) -> Result<(String, Option<String>), ExtractError> {
    let mut conv = HtmlConverter::new(limit);
    let bytes = html.as_bytes();
    let mut i = 0;
    while i < bytes.len() && !conv.w.overflowed() {
        let rest = bytes.get(i..).unwrap_or_default();
        let Some(lt) = rest.iter().position(|&b| b == b'<') else {
            conv.text(slice(html, i, bytes.len()));
            break;
        };
        conv.text(slice(html, i, i + lt));
        i += lt;
        let rest = bytes.get(i..).unwrap_or_default();
        let next = rest.get(1).copied().unwrap_or(0);
        if rest.starts_with(b"<!--") {
            i = skip_past(bytes, i + 4, b"-->");
        } else if starts_with_ci(rest, b"<![cdata[") {
            i = skip_past(bytes, i + 9, b"]]>");
        } else if next == b'!' || next == b'?' {
            i = skip_past(bytes, i + 2, b">");
        } else if next == b'/' && rest.get(2).is_some_and(u8::is_ascii_alphabetic) {
            let name = tag_name(bytes, i + 2);
            i = skip_past(bytes, i + 2, b">");
            conv.end(&name);
        } else if next.is_ascii_alphabetic() {
            let name = tag_name(bytes, i + 1);
            let (end, self_closing) = start_tag_end(bytes, i + 1 + name.len());
            i = end;
            if HTML_SKIPPED.contains(&name.as_str()) && !self_closing {
                i = skip_element(bytes, i, &name).1;
            } else if name == "title" && !self_closing {
                let (content_end, after) = skip_element(bytes, i, &name);
                conv.title(slice(html, i, content_end));
                i = after;
            } else if name == "textarea" && !self_closing {
                let (content_end, after) = skip_element(bytes, i, &name);
                conv.start("textarea");
                conv.text(slice(html, i, content_end));
                conv.end("textarea");
                i = after;
            } else {
                conv.start(&name);
            }
        } else {
            conv.text("<");
            i += 1;
        }
    }
    conv.finish()
}

fn slice(s: &str, from: usize, to: usize) -> &str {
    s.get(from..to).unwrap_or_default()
}

fn starts_with_ci(hay: &[u8], prefix: &[u8]) -> bool {
    hay.get(..prefix.len())
        .is_some_and(|h| h.eq_ignore_ascii_case(prefix))
}

/// The index just past the next `needle` at or after `from`, or the end.
fn skip_past(bytes: &[u8], from: usize, needle: &[u8]) -> usize {
    let rest = bytes.get(from..).unwrap_or_default();
    match find(rest, needle) {
        Some(pos) => from + pos + needle.len(),
        None => bytes.len(),
    }
}

/// The lower-cased tag name starting at `from`.
fn tag_name(bytes: &[u8], from: usize) -> String {
    bytes
        .get(from..)
        .unwrap_or_default()
        .iter()
        .take_while(|b| !b.is_ascii_whitespace() && !matches!(b, b'/' | b'>'))
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect()
}

/// Finds the `>` ending a start tag whose attributes begin at `from`,
/// stepping over quoted values. Returns the index after it and whether the
/// tag is self-closing. An unclosed quote falls back to the first `>`.
fn start_tag_end(bytes: &[u8], from: usize) -> (usize, bool) {
    let mut quote: Option<u8> = None;
    let mut after_equals = false;
    let mut i = from;
    while let Some(&b) = bytes.get(i) {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'>' => {
                    let self_closing = i > from && bytes.get(i - 1) == Some(&b'/');
                    return (i + 1, self_closing);
                }
                b'"' | b'\'' if after_equals => quote = Some(b),
                _ => {}
            },
        }
        if !b.is_ascii_whitespace() {
            after_equals = quote.is_none() && b == b'=';
        }
        i += 1;
    }
    let end = skip_past(bytes, from, b">");
    (end, false)
}

/// For raw-text elements: the end of the content and the index after the
/// closing tag (both the input's end if it never closes).
fn skip_element(bytes: &[u8], from: usize, name: &str) -> (usize, usize) {
    let close = format!("</{name}");
    let mut i = from;
    while let Some(rel) = bytes
        .get(i..)
        .and_then(|r| r.iter().position(|&b| b == b'<'))
    {
        let at = i + rel;
        let rest = bytes.get(at..).unwrap_or_default();
        let boundary = rest.get(close.len()).copied().unwrap_or(b'>');
        if starts_with_ci(rest, close.as_bytes())
            && (boundary.is_ascii_whitespace() || matches!(boundary, b'>' | b'/'))
        {
            return (at, skip_past(bytes, at, b">"));
        }
        i = at + 1;
    }
    (bytes.len(), bytes.len())
}

struct TableState {
    cells: usize,
    in_cell: bool,
}

struct HtmlConverter {
    w: MdWriter,
    title: Option<String>,
    first_h1: Option<String>,
    first_heading: Option<String>,
    /// The open heading's level and text so far.
    heading: Option<(usize, String)>,
    in_head: bool,
    list_depth: usize,
    pre_depth: usize,
    tables: Vec<TableState>,
    /// Open tables beyond [`MAX_HTML_TABLE_DEPTH`], read as plain content.
    deep_tables: usize,
}

impl HtmlConverter {
    fn new(limit: usize) -> Self {
        HtmlConverter {
            w: MdWriter::new(limit),
            title: None,
            first_h1: None,
            first_heading: None,
            heading: None,
            in_head: false,
            list_depth: 0,
            pre_depth: 0,
            tables: Vec::new(),
            deep_tables: 0,
        }
    }

    fn in_cell(&self) -> bool {
        self.tables.last().is_some_and(|t| t.in_cell)
    }

    /// A break, softened inside the contexts that must stay on one line.
    fn request_break(&mut self, b: Break) {
        if self.in_cell() || self.heading.is_some() {
            self.w.space();
        } else if self.list_depth > 0 {
            self.w.request_break(b.min(Break::Line));
        } else {
            self.w.request_break(b);
        }
    }

    fn text(&mut self, raw: &str) {
        if raw.is_empty() || self.in_head {
            return;
        }
        let text = decode_entities(raw);
        if let Some((_, h)) = &mut self.heading {
            h.push_str(&text);
        }
        if self.pre_depth > 0 && !self.in_cell() && self.heading.is_none() {
            self.w.raw(&text);
        } else {
            self.w.text(&text);
        }
    }

    fn title(&mut self, raw: &str) {
        if self.title.is_none() {
            self.title = clean_title(&decode_entities(raw));
        }
    }

    fn end_heading(&mut self) {
        let Some((level, text)) = self.heading.take() else {
            return;
        };
        self.w.pending_prefix.clear();
        self.w.request_break(Break::Paragraph);
        let Some(text) = clean_title(&text) else {
            return;
        };
        if level == 1 && self.first_h1.is_none() {
            self.first_h1 = Some(text.clone());
        }
        if self.first_heading.is_none() {
            self.first_heading = Some(text);
        }
    }

    fn start(&mut self, name: &str) {
        if self.in_head && !HTML_HEAD_ONLY.contains(&name) {
            self.in_head = false;
        }
        if let Some(level) = heading_level(name) {
            self.end_heading();
            self.w.request_break(Break::Paragraph);
            self.w.set_prefix(&format!("{} ", "#".repeat(level)));
            self.heading = Some((level, String::new()));
            return;
        }
        let is_block = HTML_BLOCKS.contains(&name)
            || matches!(
                name,
                "li" | "ul" | "ol" | "dl" | "dt" | "dd" | "menu" | "dir" | "pre" | "table"
            );
        if is_block {
            // Headings hold inline content only; a block means it was left open.
            self.end_heading();
        }
        match name {
            "head" => self.in_head = true,
            "br" => {
                if self.pre_depth > 0 && !self.in_cell() {
                    self.w.raw("\n");
                } else {
                    self.request_break(Break::Line);
                }
            }
            "li" => {
                self.request_break(Break::Line);
                if !self.in_cell() {
                    let indent = "  ".repeat(self.list_depth.saturating_sub(1).min(8));
                    self.w.set_prefix(&format!("{indent}- "));
                }
            }
            "ul" | "ol" | "dl" | "menu" | "dir" => {
                self.request_break(Break::Paragraph);
                self.list_depth += 1;
            }
            "dt" | "dd" => self.request_break(Break::Line),
            "pre" | "listing" | "xmp" | "plaintext" => {
                self.request_break(Break::Paragraph);
                self.pre_depth += 1;
            }
            "table" => {
                self.request_break(Break::Paragraph);
                if self.tables.len() < MAX_HTML_TABLE_DEPTH {
                    self.tables.push(TableState {
                        cells: 0,
                        in_cell: false,
                    });
                } else {
                    self.deep_tables += 1;
                }
            }
            "tr" => {
                if let Some(t) = self.tables.last_mut() {
                    t.cells = 0;
                    t.in_cell = false;
                }
                self.request_break(Break::Line);
            }
            "td" | "th" => {
                if let Some(t) = self.tables.last_mut() {
                    let separate = t.cells > 0;
                    t.cells += 1;
                    t.in_cell = true;
                    if separate {
                        self.w.pending_space = false;
                        self.w.raw(" | ");
                    }
                }
            }
            _ if is_block => self.request_break(Break::Paragraph),
            _ => {}
        }
    }

    fn end(&mut self, name: &str) {
        if heading_level(name).is_some() {
            self.end_heading();
            return;
        }
        match name {
            "head" => self.in_head = false,
            "li" | "dt" | "dd" => {
                // An item that closes before any text leaves no "- ".
                self.w.pending_prefix.clear();
                self.request_break(Break::Line);
            }
            "ul" | "ol" | "dl" | "menu" | "dir" => {
                self.w.pending_prefix.clear();
                self.list_depth = self.list_depth.saturating_sub(1);
                self.request_break(Break::Paragraph);
            }
            "pre" | "listing" | "xmp" | "plaintext" => {
                self.pre_depth = self.pre_depth.saturating_sub(1);
                self.request_break(Break::Paragraph);
            }
            "table" => {
                if self.deep_tables > 0 {
                    self.deep_tables -= 1;
                } else {
                    self.tables.pop();
                }
                self.request_break(Break::Paragraph);
            }
            "tr" => {
                if let Some(t) = self.tables.last_mut() {
                    t.in_cell = false;
                }
                self.request_break(Break::Line);
            }
            "td" | "th" => {
                if let Some(t) = self.tables.last_mut() {
                    t.in_cell = false;
                }
            }
            _ if HTML_BLOCKS.contains(&name) => self.request_break(Break::Paragraph),
            _ => {}
        }
    }

    fn finish(mut self) -> Result<(String, Option<String>), ExtractError> {
        self.end_heading();
        let title = self.title.or(self.first_h1).or(self.first_heading);
        let limit = self.w.limit as u64;
        match self.w.finish() {
            Ok(text) => Ok((text, title)),
            Err(wanted) => Err(ExtractError::TooLarge {
                what: "the extracted text".into(),
                size: wanted as u64,
                limit,
            }),
        }
    }
}

fn heading_level(name: &str) -> Option<usize> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

/// Decodes HTML character references: named (a common subset), decimal and
/// hexadecimal. Unknown names stay as written; impossible code points become
/// U+FFFD.
fn decode_entities(s: &str) -> Cow<'_, str> {
    if !s.contains('&') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(slice(rest, 0, pos));
        let after = slice(rest, pos + 1, rest.len());
        match parse_reference(after) {
            Some((c, used)) => {
                out.push(c);
                rest = slice(after, used, after.len());
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Parses the text after `&`; returns the character and bytes consumed.
fn parse_reference(after: &str) -> Option<(char, usize)> {
    let b = after.as_bytes();
    if b.first() == Some(&b'#') {
        let hex = matches!(b.get(1), Some(b'x' | b'X'));
        let start = if hex { 2 } else { 1 };
        let radix = if hex { 16 } else { 10 };
        let digits = b
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|d| char::from(**d).is_digit(radix))
            .count();
        if digits == 0 {
            return None;
        }
        let text = slice(after, start, start + digits);
        let value = u32::from_str_radix(text, radix).ok();
        let semicolon = usize::from(b.get(start + digits) == Some(&b';'));
        let c = value.map_or(char::REPLACEMENT_CHARACTER, numeric_reference);
        return Some((c, start + digits + semicolon));
    }
    let len = b
        .iter()
        .take(32)
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    let name = slice(after, 0, len);
    let c = named_entity(name)?;
    if b.get(len) == Some(&b';') {
        Some((c, len + 1))
    } else if matches!(name, "amp" | "lt" | "gt" | "quot" | "nbsp") {
        // Old pages leave the semicolon off the commonest ones.
        Some((c, len))
    } else {
        None
    }
}

fn numeric_reference(v: u32) -> char {
    // Pages labelled Latin-1 often mean Windows-1252 here; browsers agree.
    const CP1252: [u32; 32] = [
        0x20AC, 0x81, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
        0x2039, 0x0152, 0x8D, 0x017D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013,
        0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x9D, 0x017E, 0x0178,
    ];
    let v = match v {
        0x80..=0x9F => CP1252.get((v - 0x80) as usize).copied().unwrap_or(0xFFFD),
        _ => v,
    };
    match v {
        0 => char::REPLACEMENT_CHARACTER,
        v => char::from_u32(v).unwrap_or(char::REPLACEMENT_CHARACTER),
    }
}

/// Latin-1 entity names, U+00A0 to U+00FF in order.
const LATIN1_ENTITIES: [&str; 96] = [
    "nbsp", "iexcl", "cent", "pound", "curren", "yen", "brvbar", "sect", "uml", "copy", "ordf",
    "laquo", "not", "shy", "reg", "macr", "deg", "plusmn", "sup2", "sup3", "acute", "micro",
    "para", "middot", "cedil", "sup1", "ordm", "raquo", "frac14", "frac12", "frac34", "iquest",
    "Agrave", "Aacute", "Acirc", "Atilde", "Auml", "Aring", "AElig", "Ccedil", "Egrave", "Eacute",
    "Ecirc", "Euml", "Igrave", "Iacute", "Icirc", "Iuml", "ETH", "Ntilde", "Ograve", "Oacute",
    "Ocirc", "Otilde", "Ouml", "times", "Oslash", "Ugrave", "Uacute", "Ucirc", "Uuml", "Yacute",
    "THORN", "szlig", "agrave", "aacute", "acirc", "atilde", "auml", "aring", "aelig", "ccedil",
    "egrave", "eacute", "ecirc", "euml", "igrave", "iacute", "icirc", "iuml", "eth", "ntilde",
    "ograve", "oacute", "ocirc", "otilde", "ouml", "divide", "oslash", "ugrave", "uacute", "ucirc",
    "uuml", "yacute", "thorn", "yuml",
];

/// Greek capitals from U+0391 (U+03A2 is unassigned) and small letters from U+03B1.
const GREEK_UPPER: [&str; 25] = [
    "Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta", "Iota", "Kappa",
    "Lambda", "Mu", "Nu", "Xi", "Omicron", "Pi", "Rho", "", "Sigma", "Tau", "Upsilon", "Phi",
    "Chi", "Psi", "Omega",
];
const GREEK_LOWER: [&str; 25] = [
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigmaf", "sigma", "tau", "upsilon", "phi",
    "chi", "psi", "omega",
];

fn named_entity(name: &str) -> Option<char> {
    if name.is_empty() {
        return None;
    }
    let indexed = |table: &[&str], base: u32| {
        table
            .iter()
            .position(|n| *n == name)
            .and_then(|i| char::from_u32(base + i as u32))
    };
    if let Some(c) = indexed(&LATIN1_ENTITIES, 0xA0)
        .or_else(|| indexed(&GREEK_UPPER, 0x391))
        .or_else(|| indexed(&GREEK_LOWER, 0x3B1))
    {
        return Some(c);
    }
    let code = match name {
        "quot" => 0x22,
        "amp" => 0x26,
        "apos" => 0x27,
        "lt" => 0x3C,
        "gt" => 0x3E,
        "OElig" => 0x152,
        "oelig" => 0x153,
        "Scaron" => 0x160,
        "scaron" => 0x161,
        "Yuml" => 0x178,
        "fnof" => 0x192,
        "circ" => 0x2C6,
        "tilde" => 0x2DC,
        "thetasym" => 0x3D1,
        "ensp" => 0x2002,
        "emsp" => 0x2003,
        "thinsp" => 0x2009,
        "zwnj" => 0x200C,
        "zwj" => 0x200D,
        "lrm" => 0x200E,
        "rlm" => 0x200F,
        "ndash" => 0x2013,
        "mdash" => 0x2014,
        "lsquo" => 0x2018,
        "rsquo" => 0x2019,
        "sbquo" => 0x201A,
        "ldquo" => 0x201C,
        "rdquo" => 0x201D,
        "bdquo" => 0x201E,
        "dagger" => 0x2020,
        "Dagger" => 0x2021,
        "bull" => 0x2022,
        "hellip" => 0x2026,
        "permil" => 0x2030,
        "prime" => 0x2032,
        "Prime" => 0x2033,
        "lsaquo" => 0x2039,
        "rsaquo" => 0x203A,
        "oline" => 0x203E,
        "frasl" => 0x2044,
        "euro" => 0x20AC,
        "trade" => 0x2122,
        "larr" => 0x2190,
        "uarr" => 0x2191,
        "rarr" => 0x2192,
        "darr" => 0x2193,
        "harr" => 0x2194,
        "lArr" => 0x21D0,
        "rArr" => 0x21D2,
        "hArr" => 0x21D4,
        "forall" => 0x2200,
        "part" => 0x2202,
        "exist" => 0x2203,
        "empty" => 0x2205,
        "nabla" => 0x2207,
        "isin" => 0x2208,
        "prod" => 0x220F,
        "sum" => 0x2211,
        "minus" => 0x2212,
        "radic" => 0x221A,
        "infin" => 0x221E,
        "and" => 0x2227,
        "or" => 0x2228,
        "cap" => 0x2229,
        "cup" => 0x222A,
        "int" => 0x222B,
        "there4" => 0x2234,
        "sim" => 0x223C,
        "asymp" => 0x2248,
        "ne" => 0x2260,
        "equiv" => 0x2261,
        "le" => 0x2264,
        "ge" => 0x2265,
        "sub" => 0x2282,
        "sup" => 0x2283,
        "sube" => 0x2286,
        "supe" => 0x2287,
        "loz" => 0x25CA,
        "spades" => 0x2660,
        "clubs" => 0x2663,
        "hearts" => 0x2665,
        "diams" => 0x2666,
        _ => return None,
    };
    char::from_u32(code)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use crate::extract::fixtures::run;
    use crate::extract::{extract, tidy, Format, Limits};

    use super::*;

    #[test]
    fn html_becomes_markdown_style_text() {
        let html = r#"<!DOCTYPE html><html><head><title>My &amp; Page</title>
<style>body { color: red }</style><script>var x = "<p>not text</p>";</script></head>
<body><h1>Main  Heading</h1><p>First   para with <b>bold</b> and &copy; 2024 &mdash; ok&hellip;</p>
<ul><li>One</li><li>Two <a href="x">link</a>
  <ul><li>Nested</li></ul></li></ul>
<table><tr><th>Name</th> <th>Qty</th></tr>
<tr><td>Apple</td>
<td><p>3</p></td></tr></table>
<!-- a <p>comment</p> --><p>Line<br>break</p><pre>  code
  block</pre><noscript>enable js</noscript><h2></h2><p>中文内容，保持不变。</p></body></html>"#;
        let out = run(html.as_bytes(), "page.html").unwrap();
        assert_eq!(out.format, Format::Html);
        assert_eq!(out.title.as_deref(), Some("My & Page"));
        assert_eq!(
            out.text,
            "# Main Heading\n\nFirst para with bold and © 2024 — ok…\n\n- One\n- Two link\n  - Nested\n\n\
             Name | Qty\nApple | 3\n\nLine\nbreak\n\n  code\n  block\n\n中文内容，保持不变。"
        );
    }

    #[test]
    fn html_title_falls_back_to_the_first_heading() {
        let out = run(b"<div><h2>Second</h2><h1>First <i>one</i></h1></div>", "").unwrap();
        assert_eq!(out.title.as_deref(), Some("First one"));
        let out = run(b"<div><h3>Only  h3</h3></div>", "").unwrap();
        assert_eq!(out.title.as_deref(), Some("Only h3"));
    }

    #[test]
    fn malformed_html_is_converted_tolerantly() {
        let cases = [
            ("<p>unclosed <b>bold <i>text", "unclosed bold text"),
            ("<p>a < b and c > d</p>", "a < b and c > d"),
            (
                r#"<a title="x > y" data-z='1>2'>link</a> after"#,
                "link after",
            ),
            (
                "<h1>Heading never closed<p>Para",
                "# Heading never closed\n\nPara",
            ),
            ("<li>loose<li>items", "- loose\n- items"),
            ("text<!-- unclosed comment <p>gone", "text"),
            ("text <script>never closed", "text"),
            ("<td>cell</td><td>outside</td>", "celloutside"),
            ("<p>tail <", "tail <"),
            ("<p>x</p></div></div></ul></table></pre>y", "x\n\ny"),
            ("<div class=\"unterminated>text</div>", "text"),
            (
                "<p>&#xZZ; &#; &; &unknown; 5 &lt 6</p>",
                "&#xZZ; &#; &; &unknown; 5 < 6",
            ),
            ("<SCRIPT>hidden()</SCRIPT ><P>Shown</P>", "Shown"),
            ("<![CDATA[ raw ]]>after", "after"),
        ];
        for (html, want) in cases {
            let (text, _) = html_to_text(html, usize::MAX).unwrap();
            assert_eq!(tidy(&text), want, "input: {html}");
        }
        let deep = "<ul><li>".repeat(2000) + "deep";
        let (text, _) = html_to_text(&deep, usize::MAX).unwrap();
        assert!(text.ends_with("- deep"));
    }

    #[test]
    fn character_references_are_decoded() {
        let s = "&lt;a&gt; &amp;amp; &#65;&#x42;&#X43; &#0; &#xD800; &#x110000; &#150; &nbsp;x \
                 &notanentity; &amp AT&T &#99999999999; &eacute;&Omega;&rsquo;&lsquo;&rdquo;&ldquo;&ndash;&apos;&quot;";
        assert_eq!(
            decode_entities(s),
            "<a> &amp; ABC \u{FFFD} \u{FFFD} \u{FFFD} \u{2013} \u{A0}x &notanentity; & AT&T \u{FFFD} \
             éΩ\u{2019}\u{2018}\u{201D}\u{201C}\u{2013}'\""
        );
        assert_eq!(decode_entities("no refs"), "no refs");
    }

    #[test]
    fn html_without_text_has_no_text() {
        let err = run(
            b"<html><head><title>T</title></head><body><img src=x></body></html>",
            "",
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::NoText {
                    format: Format::Html
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), "no_text");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn html_never_panics_and_output_is_tidy(
            html in r#"([<>/!\-="' &#;x]|[a-z]{1,6}|h[1-6]|li|td|tr|pre|br|script|title|[0-9]|中|\n){0,200}"#,
        ) {
            let out = extract(html.as_bytes(), "x.html", &Limits::default());
            if let Ok(out) = out {
                prop_assert!(!out.text.contains("\n\n\n"));
                prop_assert!(out.text.lines().all(|l| l == l.trim_end()));
                prop_assert!(!out.text.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
            }
        }
    }
}

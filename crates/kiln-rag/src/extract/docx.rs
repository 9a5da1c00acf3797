//! Word (.docx) to the shared Markdown-style shape: `word/document.xml` is
//! streamed through quick-xml, with paragraph styles from `word/styles.xml`
//! deciding headings, titles and lists. The ZIP container is checked by its
//! directory before any part is read, and each part is inflated against the
//! [`Limits`] budget and a compression-ratio bound.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Read};

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use zip::result::ZipError;
use zip::ZipArchive;

use super::{guarded, Break, ExtractError, Format, Limits, MdWriter};

/// A ZIP with more entries than this is refused before any is read.
const MAX_ZIP_ENTRIES: usize = 10_000;
/// An entry may inflate to this many times its compressed size...
const MAX_COMPRESSION_RATIO: u64 = 200;
/// ...once it is past this size; small XML parts often compress further.
const RATIO_FREE_BYTES: u64 = 8 * 1024 * 1024;
/// Deeper XML is refused: real Word documents nest a few dozen levels, and
/// the parser keeps every open element in memory.
const MAX_XML_DEPTH: usize = 512;

type Zip<'a> = ZipArchive<Cursor<&'a [u8]>>;

fn docx_corrupt(reason: impl Into<String>) -> ExtractError {
    ExtractError::Corrupt {
        format: Format::Docx,
        reason: reason.into(),
    }
}

pub(super) fn docx_to_text(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(String, Option<String>), ExtractError> {
    match guarded(|| docx_to_text_unguarded(bytes, limits)) {
        Some(result) => result,
        None => {
            tracing::warn!("the DOCX reader panicked; reporting the file as damaged");
            Err(docx_corrupt("its structure could not be parsed"))
        }
    }
}

fn docx_to_text_unguarded(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(String, Option<String>), ExtractError> {
    let mut archive = ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| docx_corrupt(format!("its ZIP container is damaged ({e})")))?;
    check_archive(&mut archive, limits)?;
    let mut budget = limits.max_uncompressed_bytes;
    let styles = if archive.index_for_name("word/styles.xml").is_some() {
        read_entry(&mut archive, "word/styles.xml", &mut budget, parse_styles)?
    } else {
        StyleMap::default()
    };
    read_entry(&mut archive, "word/document.xml", &mut budget, |r| {
        convert_document(r, &styles, limits.max_text_bytes)
    })
}

/// Refuses archives whose directory alone shows they are too big to open.
fn check_archive(archive: &mut Zip<'_>, limits: &Limits) -> Result<(), ExtractError> {
    if archive.len() > MAX_ZIP_ENTRIES {
        return Err(ExtractError::Refused {
            format: Format::Docx,
            reason: format!(
                "its archive has {} entries; at most {MAX_ZIP_ENTRIES} are accepted",
                archive.len()
            ),
        });
    }
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| docx_corrupt(format!("its ZIP container is damaged ({e})")))?;
        if entry.size() > limits.max_uncompressed_bytes {
            return Err(ExtractError::TooLarge {
                what: format!("the part {} of the Word document", entry.name()),
                size: entry.size(),
                limit: limits.max_uncompressed_bytes,
            });
        }
        total = total.saturating_add(entry.size());
    }
    if total > limits.max_uncompressed_bytes {
        return Err(ExtractError::TooLarge {
            what: "the uncompressed content of the Word document".into(),
            size: total,
            limit: limits.max_uncompressed_bytes,
        });
    }
    Ok(())
}

/// Streams one entry through `parse`, inflating at most the remaining
/// `budget`, and at most [`MAX_COMPRESSION_RATIO`] times the entry's
/// compressed size once past [`RATIO_FREE_BYTES`]: declared sizes can lie,
/// so the bound is enforced on the bytes actually read.
fn read_entry<T>(
    archive: &mut Zip<'_>,
    name: &str,
    budget: &mut u64,
    parse: impl FnOnce(&mut dyn BufRead) -> Result<T, ExtractError>,
) -> Result<T, ExtractError> {
    let entry = archive.by_name(name).map_err(|e| match e {
        ZipError::UnsupportedArchive(ZipError::PASSWORD_REQUIRED) | ZipError::InvalidPassword => {
            ExtractError::Encrypted {
                format: Format::Docx,
            }
        }
        ZipError::FileNotFound => docx_corrupt(format!("it has no {name}")),
        other => docx_corrupt(format!("{name} cannot be opened ({other})")),
    })?;
    let by_ratio = entry
        .compressed_size()
        .saturating_mul(MAX_COMPRESSION_RATIO)
        .max(RATIO_FREE_BYTES);
    let cap = (*budget).min(by_ratio);
    let mut reader = BufReader::new(entry.take(cap.saturating_add(1)));
    let parsed = parse(&mut reader);
    let read = cap.saturating_add(1) - reader.get_ref().limit();
    if read > cap {
        return Err(if cap < *budget {
            ExtractError::Refused {
                format: Format::Docx,
                reason: format!(
                    "{name} expands to more than {MAX_COMPRESSION_RATIO} times its compressed size \
                     (a likely zip bomb)"
                ),
            }
        } else {
            ExtractError::TooLarge {
                what: "the uncompressed content of the Word document".into(),
                size: read,
                limit: cap,
            }
        });
    }
    *budget = budget.saturating_sub(read);
    parsed
}

#[derive(Debug, Default, Clone)]
struct StyleInfo {
    heading: Option<u8>,
    title: bool,
    list: bool,
    based_on: Option<String>,
}

/// Paragraph styles by id, from `word/styles.xml`.
#[derive(Debug, Default)]
struct StyleMap(HashMap<String, StyleInfo>);

impl StyleMap {
    /// Follows `basedOn` links; ids not in the map are read by their name.
    fn resolve(&self, id: &str) -> StyleInfo {
        let mut merged = StyleInfo::default();
        let mut current = Some(id.to_string());
        for depth in 0..10 {
            let Some(cid) = current.take() else { break };
            let Some(info) = self.0.get(&cid) else {
                if depth == 0 {
                    return style_from_name(&cid);
                }
                break;
            };
            merged.title |= info.title;
            merged.list |= info.list;
            merged.heading = merged.heading.or(info.heading);
            current = info.based_on.clone();
        }
        merged
    }
}

/// Built-in style names ("heading 1", "Title") and their usual ids
/// ("Heading1").
fn style_from_name(name: &str) -> StyleInfo {
    let lower = name.to_ascii_lowercase();
    let compact: String = lower.chars().filter(|c| !c.is_whitespace()).collect();
    let mut info = StyleInfo::default();
    if compact == "title" {
        info.title = true;
    } else if let Some(n) = compact.strip_prefix("heading") {
        info.heading = n
            .parse::<u8>()
            .ok()
            .filter(|n| (1..=9).contains(n))
            .map(|n| n.min(6));
    }
    info
}

fn attr(e: &BytesStart<'_>, key: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == key)
        .map(|a| {
            a.normalized_value(XmlVersion::Implicit1_0)
                .map(Cow::into_owned)
                .unwrap_or_else(|_| a.value.clone().into_owned())
        })
}

/// Keeps the nesting depth, refusing documents nested absurdly deep.
fn track_depth(event: &Event<'_>, depth: &mut usize, part: &str) -> Result<(), ExtractError> {
    match event {
        Event::Start(_) => {
            *depth += 1;
            if *depth > MAX_XML_DEPTH {
                return Err(docx_corrupt(format!(
                    "{part} nests elements more than {MAX_XML_DEPTH} levels deep"
                )));
            }
        }
        Event::End(_) => *depth = depth.saturating_sub(1),
        _ => {}
    }
    Ok(())
}

fn outline_heading(val: Option<String>) -> Option<u8> {
    let level = val?.trim().parse::<u8>().ok()?;
    (level < 9).then(|| (level + 1).min(6))
}

fn parse_styles(reader: &mut dyn BufRead) -> Result<StyleMap, ExtractError> {
    let mut xml = Reader::from_reader(reader);
    xml.config_mut().check_end_names = false;
    let mut map = HashMap::new();
    let mut current: Option<(String, StyleInfo)> = None;
    let mut buf = Vec::new();
    let mut depth = 0usize;
    loop {
        let event = xml
            .read_event_into(&mut buf)
            .map_err(|e| docx_corrupt(format!("word/styles.xml is not valid XML ({e})")))?;
        track_depth(&event, &mut depth, "word/styles.xml")?;
        match event {
            Event::Start(e) | Event::Empty(e) => {
                let local = e.local_name();
                match (local.as_ref(), &mut current) {
                    ("style", None) => {
                        let paragraph = attr(&e, "type").is_none_or(|t| t == "paragraph");
                        if let (true, Some(id)) = (paragraph, attr(&e, "styleId")) {
                            current = Some((id, StyleInfo::default()));
                        }
                    }
                    ("name", Some((_, info))) => {
                        let named = style_from_name(&attr(&e, "val").unwrap_or_default());
                        info.title |= named.title;
                        info.heading = info.heading.or(named.heading);
                    }
                    ("basedOn", Some((_, info))) => info.based_on = attr(&e, "val"),
                    ("outlineLvl", Some((_, info))) => {
                        info.heading = info.heading.or(outline_heading(attr(&e, "val")));
                    }
                    ("numPr", Some((_, info))) => info.list = true,
                    _ => {}
                }
            }
            Event::End(e) if e.local_name().as_ref() == "style" => {
                if let Some((id, info)) = current.take() {
                    map.insert(id, info);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    Ok(StyleMap(map))
}

#[derive(Debug, Default)]
struct Paragraph {
    style: Option<String>,
    outline: Option<u8>,
    numbered: bool,
    /// `numId 0`: numbering a style would add is switched off.
    numbering_off: bool,
    level: u8,
    text: String,
}

#[derive(Debug, Default)]
struct DocxTable {
    /// The current row's finished cells, already joined by ` | `.
    row: String,
    cells: usize,
    cell: Option<String>,
}

impl DocxTable {
    fn finish_cell(&mut self) {
        let Some(cell) = self.cell.take() else { return };
        if self.cells > 0 {
            self.row.push_str(" | ");
        }
        self.cells += 1;
        for (i, word) in cell.split_whitespace().enumerate() {
            if i > 0 {
                self.row.push(' ');
            }
            self.row.push_str(word);
        }
    }
}

enum ParaKind {
    Body,
    Title,
    Heading(u8),
    List(u8),
}

/// Elements whose content is not document text: the fallback copy of
/// alternate content, deleted and moved-away text, field codes.
const DOCX_SKIPPED: &[&str] = &[
    "Fallback",
    "delText",
    "delInstrText",
    "instrText",
    "moveFrom",
];

struct DocxConverter<'s> {
    styles: &'s StyleMap,
    w: MdWriter,
    paragraphs: Vec<Paragraph>,
    tables: Vec<DocxTable>,
    in_ppr: bool,
    in_num_pr: bool,
    run_depth: usize,
    in_text: bool,
    skip_depth: usize,
    last_was_list: bool,
    title: Option<String>,
    first_h1: Option<String>,
}

fn convert_document(
    reader: &mut dyn BufRead,
    styles: &StyleMap,
    limit: usize,
) -> Result<(String, Option<String>), ExtractError> {
    let mut xml = Reader::from_reader(reader);
    xml.config_mut().check_end_names = false;
    let mut conv = DocxConverter {
        styles,
        w: MdWriter::new(limit),
        paragraphs: Vec::new(),
        tables: Vec::new(),
        in_ppr: false,
        in_num_pr: false,
        run_depth: 0,
        in_text: false,
        skip_depth: 0,
        last_was_list: false,
        title: None,
        first_h1: None,
    };
    let mut buf = Vec::new();
    let mut depth = 0usize;
    loop {
        let event = xml
            .read_event_into(&mut buf)
            .map_err(|e| docx_corrupt(format!("word/document.xml is not valid XML ({e})")))?;
        track_depth(&event, &mut depth, "word/document.xml")?;
        match event {
            Event::Start(e) => conv.open(&e, false),
            Event::Empty(e) => conv.open(&e, true),
            Event::End(e) => conv.close(e.local_name().as_ref()),
            Event::Text(t) => conv.text(&t),
            Event::CData(t) => conv.text(&t),
            Event::GeneralRef(r) => conv.reference(&r),
            Event::Eof => break,
            _ => {}
        }
        if conv.w.overflowed() || conv.pending_text_len() > limit {
            let size = conv.w.wanted.max(conv.pending_text_len());
            return Err(ExtractError::TooLarge {
                what: "the extracted text".into(),
                size: size as u64,
                limit: limit as u64,
            });
        }
        buf.clear();
    }
    let title = conv.title.take().or(conv.first_h1.take());
    let text = conv.w.finish().map_err(|size| ExtractError::TooLarge {
        what: "the extracted text".into(),
        size: size as u64,
        limit: limit as u64,
    })?;
    Ok((text, title))
}

impl DocxConverter<'_> {
    fn pending_text_len(&self) -> usize {
        let para = self.paragraphs.last().map_or(0, |p| p.text.len());
        let cell = self
            .tables
            .last()
            .map_or(0, |t| t.row.len() + t.cell.as_ref().map_or(0, String::len));
        para.saturating_add(cell)
    }

    fn push_text(&mut self, s: &str) {
        if let Some(p) = self.paragraphs.last_mut() {
            p.text.push_str(s);
        }
    }

    fn open(&mut self, e: &BytesStart<'_>, empty: bool) {
        let local = e.local_name();
        let name = local.as_ref();
        if self.skip_depth > 0 {
            if !empty {
                self.skip_depth += 1;
            }
            return;
        }
        if DOCX_SKIPPED.contains(&name) {
            if !empty {
                self.skip_depth = 1;
            }
            return;
        }
        let in_run = self.run_depth > 0 && !self.in_ppr;
        match name {
            "p" if !empty => self.paragraphs.push(Paragraph::default()),
            "pPr" if !empty => self.in_ppr = true,
            "numPr" if self.in_ppr => {
                self.in_num_pr = !empty;
                if let Some(p) = self.paragraphs.last_mut() {
                    p.numbered = true;
                }
            }
            "pStyle" if self.in_ppr => {
                if let Some(p) = self.paragraphs.last_mut() {
                    p.style = attr(e, "val");
                }
            }
            "ilvl" if self.in_num_pr => {
                let level = attr(e, "val").and_then(|v| v.trim().parse::<u8>().ok());
                if let Some(p) = self.paragraphs.last_mut() {
                    p.level = level.unwrap_or(0).min(8);
                }
            }
            "numId" if self.in_num_pr => {
                // numId 0 switches off numbering a style would add.
                let off = attr(e, "val").is_some_and(|v| v.trim() == "0");
                if let Some(p) = self.paragraphs.last_mut() {
                    p.numbering_off |= off;
                }
            }
            "outlineLvl" if self.in_ppr => {
                let level = outline_heading(attr(e, "val"));
                if let Some(p) = self.paragraphs.last_mut() {
                    p.outline = level;
                }
            }
            "r" if !empty => self.run_depth += 1,
            "t" if !empty => self.in_text = true,
            "tab" | "ptab" if in_run => self.push_text("\t"),
            "br" | "cr" if in_run => self.push_text("\n"),
            "noBreakHyphen" if in_run => self.push_text("-"),
            "tbl" if !empty => {
                if self.tables.is_empty() {
                    self.w.request_break(Break::Paragraph);
                }
                self.tables.push(DocxTable::default());
                self.last_was_list = false;
            }
            "tr" if !empty => {
                if let Some(t) = self.tables.last_mut() {
                    t.row.clear();
                    t.cells = 0;
                    t.cell = None;
                }
            }
            "tc" => {
                if let Some(t) = self.tables.last_mut() {
                    t.finish_cell();
                    t.cell = Some(String::new());
                    // An empty cell still holds its column.
                    if empty {
                        t.finish_cell();
                    }
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, name: &str) {
        if self.skip_depth > 0 {
            self.skip_depth -= 1;
            return;
        }
        match name {
            "p" => {
                if let Some(p) = self.paragraphs.pop() {
                    self.emit_paragraph(p);
                }
            }
            "pPr" => {
                self.in_ppr = false;
                self.in_num_pr = false;
            }
            "numPr" => self.in_num_pr = false,
            "r" => self.run_depth = self.run_depth.saturating_sub(1),
            "t" => self.in_text = false,
            "tc" => {
                if let Some(t) = self.tables.last_mut() {
                    t.finish_cell();
                }
            }
            "tr" => {
                let Some(t) = self.tables.last_mut() else {
                    return;
                };
                t.finish_cell();
                t.cells = 0;
                let line = std::mem::take(&mut t.row);
                if line.chars().any(|c| !c.is_whitespace() && c != '|') {
                    self.emit_row(&line);
                }
            }
            "tbl" => {
                self.tables.pop();
                if self.tables.is_empty() {
                    self.w.request_break(Break::Paragraph);
                }
            }
            _ => {}
        }
    }

    fn text(&mut self, s: &str) {
        if self.in_text && self.skip_depth == 0 {
            self.push_text(s);
        }
    }

    fn reference(&mut self, r: &BytesRef<'_>) {
        if !self.in_text || self.skip_depth > 0 {
            return;
        }
        let c = match r.resolve_char_ref() {
            Ok(Some(c)) => Some(c),
            Ok(None) => match r.as_ref() {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => None,
            },
            Err(_) => Some(char::REPLACEMENT_CHARACTER),
        };
        if let Some(c) = c {
            self.push_text(c.encode_utf8(&mut [0; 4]));
        }
    }

    /// The open table cell that paragraphs currently belong to.
    fn open_cell(&mut self) -> Option<&mut String> {
        self.tables.last_mut().and_then(|t| t.cell.as_mut())
    }

    fn append_to_cell(&mut self, text: &str) -> bool {
        let Some(cell) = self.open_cell() else {
            return false;
        };
        if !cell.is_empty() && !text.is_empty() {
            cell.push(' ');
        }
        cell.push_str(text);
        true
    }

    fn kind(&self, p: &Paragraph) -> ParaKind {
        let style = p
            .style
            .as_deref()
            .map(|id| self.styles.resolve(id))
            .unwrap_or_default();
        if style.title {
            return ParaKind::Title;
        }
        if let Some(level) = p.outline.or(style.heading) {
            return ParaKind::Heading(level.clamp(1, 6));
        }
        if !p.numbering_off && (p.numbered || style.list) {
            return ParaKind::List(p.level);
        }
        ParaKind::Body
    }

    fn emit_paragraph(&mut self, p: Paragraph) {
        let text = p
            .text
            .trim_matches(|c: char| c == ' ' || c == '\n' || c == '\t');
        if self.append_to_cell(text) || text.trim().is_empty() {
            return;
        }
        let kind = self.kind(&p);
        let is_list = matches!(kind, ParaKind::List(_));
        match kind {
            ParaKind::Title | ParaKind::Heading(_) => {
                let level = match kind {
                    ParaKind::Heading(level) => usize::from(level),
                    _ => 1,
                };
                let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
                if matches!(kind, ParaKind::Title) && self.title.is_none() {
                    self.title = Some(line.clone());
                }
                if level == 1 && self.first_h1.is_none() {
                    self.first_h1 = Some(line.clone());
                }
                self.w.request_break(Break::Paragraph);
                self.w.raw(&format!("{} {line}", "#".repeat(level)));
                self.w.request_break(Break::Paragraph);
            }
            ParaKind::List(level) => {
                let b = if self.last_was_list {
                    Break::Line
                } else {
                    Break::Paragraph
                };
                self.w.request_break(b);
                let indent = "  ".repeat(usize::from(level));
                self.w
                    .raw(&format!("{indent}- {}", text.replace('\n', " ")));
            }
            ParaKind::Body => {
                self.w.request_break(Break::Paragraph);
                self.w.raw(text);
            }
        }
        self.last_was_list = is_list;
    }

    fn emit_row(&mut self, line: &str) {
        // A nested table's row becomes text of the enclosing cell.
        if self.tables.len() > 1 {
            let outer = self.tables.len() - 2;
            if let Some(cell) = self.tables.get_mut(outer).and_then(|t| t.cell.as_mut()) {
                if !cell.is_empty() {
                    cell.push(' ');
                }
                cell.push_str(line);
                return;
            }
        }
        self.w.request_break(Break::Line);
        self.w.raw(line);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    use crate::extract::extract;
    use crate::extract::fixtures::{
        declare_size, document_xml, docx, run, spaces_docx, zip_of, CONTENT_TYPES, SAMPLE_BODY,
    };

    use super::*;

    #[test]
    fn docx_paragraphs_headings_lists_and_tables() {
        let out = run(&docx(SAMPLE_BODY), "report.docx").unwrap();
        assert_eq!(out.format, Format::Docx);
        assert_eq!(out.title.as_deref(), Some("Quarterly Report"));
        assert_eq!(
            out.text,
            "# Quarterly Report\n\n## Overview\n\nSales grew 12% & costs fell…\n\n\
             - First item\n  - Nested item\n\nRegion | Revenue\n华东 区域 | 100\n\n\
             中文段落，测试。\tTabbed\nNext line\n\nbox text"
        );
    }

    #[test]
    fn docx_heading_styles_resolve_through_styles_xml() {
        let styles = r#"<?xml version="1.0"?><w:styles xmlns:w="w">
<w:style w:type="paragraph" w:styleId="a1"><w:name w:val="heading 1"/></w:style>
<w:style w:type="paragraph" w:styleId="Mine"><w:name w:val="My Heading"/><w:basedOn w:val="a1"/></w:style>
<w:style w:type="paragraph" w:styleId="Outline"><w:name w:val="Custom"/><w:pPr><w:outlineLvl w:val="2"/></w:pPr></w:style>
<w:style w:type="paragraph" w:styleId="Bullets"><w:name w:val="List Bullet"/><w:pPr><w:numPr><w:numId w:val="3"/></w:numPr></w:pPr></w:style>
<w:style w:type="character" w:styleId="Heading1Char"><w:name w:val="heading 1 char"/></w:style>
</w:styles>"#;
        let body = r#"<w:p><w:pPr><w:pStyle w:val="a1"/></w:pPr><w:r><w:t>概述</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="Mine"/></w:pPr><w:r><w:t>Derived</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="Outline"/></w:pPr><w:r><w:t>Third</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="Bullets"/></w:pPr><w:r><w:t>Point</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="Bullets"/><w:numPr><w:numId w:val="0"/></w:numPr></w:pPr><w:r><w:t>Not a point</w:t></w:r></w:p>"#;
        let bytes = zip_of(&[
            ("[Content_Types].xml", CONTENT_TYPES.as_bytes()),
            ("word/styles.xml", styles.as_bytes()),
            ("word/document.xml", document_xml(body).as_bytes()),
        ]);
        let out = run(&bytes, "").unwrap();
        assert_eq!(out.title.as_deref(), Some("概述"));
        assert_eq!(
            out.text,
            "# 概述\n\n# Derived\n\n### Third\n\n- Point\n\nNot a point"
        );
    }

    #[test]
    fn docx_nested_tables_fold_into_the_outer_cell() {
        let cell = |t: &str| format!("<w:tc><w:p><w:r><w:t>{t}</w:t></w:r></w:p></w:tc>");
        let inner = format!("<w:tbl><w:tr>{}{}</w:tr></w:tbl>", cell("A"), cell("B"));
        let body = format!(
            "<w:tbl><w:tr>{}<w:tc>{inner}</w:tc><w:tc/><w:tc></w:tc></w:tr><w:tr><w:tc/></w:tr></w:tbl>",
            cell("Outer")
        );
        let out = run(&docx(&body), "").unwrap();
        assert_eq!(out.text, "Outer | A | B |  |");
    }

    #[test]
    fn docx_without_text_has_no_text() {
        let err = run(&docx("<w:p/><w:p><w:r><w:t>  </w:t></w:r></w:p>"), "a.docx").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::NoText {
                    format: Format::Docx
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_zip_bomb_docx_is_refused_by_ratio_without_inflating_it() {
        let bytes = spaces_docx(24 << 20);
        assert!(bytes.len() < 200_000, "fixture is {} bytes", bytes.len());
        let err = run(&bytes, "bomb.docx").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Refused {
                    format: Format::Docx,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), "too_large");
        assert!(err.to_string().contains("zip bomb"), "{err}");
    }

    #[test]
    fn declared_sizes_are_checked_and_so_are_actual_ones() {
        let limits = Limits {
            max_uncompressed_bytes: 1 << 20,
            ..Limits::default()
        };
        let mut bytes = spaces_docx(3 << 20);
        let err = extract(&bytes, "big.docx", &limits).unwrap_err();
        assert!(matches!(err, ExtractError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("word/document.xml"), "{err}");

        // The archive now claims a small part; reading it must still stop.
        declare_size(&mut bytes, "word/document.xml", 1000);
        let err = extract(&bytes, "big.docx", &limits).unwrap_err();
        assert!(matches!(err, ExtractError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("uncompressed content"), "{err}");
    }

    #[test]
    fn an_archive_with_too_many_entries_is_refused() {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        zip.start_file("word/document.xml", opts).unwrap();
        zip.write_all(document_xml("<w:p><w:r><w:t>x</w:t></w:r></w:p>").as_bytes())
            .unwrap();
        for i in 0..MAX_ZIP_ENTRIES {
            zip.start_file(format!("media/{i}"), opts).unwrap();
        }
        let bytes = zip.finish().unwrap().into_inner();
        let err = run(&bytes, "many.docx").unwrap_err();
        assert!(matches!(err, ExtractError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("10001 entries"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn docx_markup_never_panics(
            parts in prop::collection::vec(prop::sample::select(vec![
                "<w:p>", "</w:p>", "<w:r>", "</w:r>", "<w:t>", "</w:t>", "text", "<w:tab/>",
                "<w:br/>", "<w:tbl>", "</w:tbl>", "<w:tr>", "</w:tr>", "<w:tc>", "</w:tc>",
                "<w:pPr>", "</w:pPr>", "<w:numPr>", "</w:numPr>", "<w:pStyle w:val=\"Heading1\"/>",
                "<mc:Fallback>", "</mc:Fallback>", "&amp;", "&#0;", "<", "中",
            ]), 0..80),
        ) {
            let body = parts.concat();
            let _ = extract(&docx(&body), "x.docx", &Limits::default());
        }
    }
}

//! Text extraction: the bytes of an uploaded file to plain text that keeps
//! the document's structure as Markdown-style lines.
//!
//! The format is decided from the content first and the name second: magic
//! numbers for PDF, ZIP (a `.docx` is a ZIP holding `word/document.xml`) and
//! known binary types, then the text encoding, then HTML or Markdown markers.
//! A name only breaks ties between text formats, and a name that promises a
//! PDF or DOCX whose content is something else is reported, not guessed at.
//!
//! Every format comes out in one shape, so the chunker sees structure the
//! same way: `#`..`######` headings, paragraphs separated by one blank line,
//! list items as `- ` lines, table rows as cells joined by ` | `.
//!
//! Invariants:
//! - no input makes this module panic: our own parsing never indexes out of
//!   bounds, and the third-party parsers (zip, lopdf, pdf-extract) run under
//!   `catch_unwind`, a panic there reported as a damaged file;
//! - no more than [`Limits`] allows is read, decompressed or produced: ZIP
//!   entries are checked by declared size and again while they inflate, and
//!   PDF page content is inflated against a budget before pdf-extract runs;
//! - the text has `\n` line ends, no trailing spaces, no control characters
//!   but `\t` and `\n`, and never two blank lines in a row.
//!
//! Layout: `detect` decides the format and decodes text files, `html`,
//! `docx` and `pdf` turn one format each into the shared shape, and this
//! module holds the public types, the entry points and what the converters
//! share (the `MdWriter` output builder, `tidy`, panic guarding).

mod detect;
mod docx;
mod html;
mod pdf;

use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use self::detect::{markdown_title, sniff, Sniffed};
use self::docx::docx_to_text;
use self::html::html_to_text;
use self::pdf::pdf_to_text;

/// Titles longer than this are cut (in characters).
const MAX_TITLE_CHARS: usize = 300;

/// The formats text can be extracted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
    Docx,
}

impl Format {
    /// The stable machine name, as stored and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Markdown => "markdown",
            Format::Html => "html",
            Format::Pdf => "pdf",
            Format::Docx => "docx",
        }
    }

    /// The name people know the format by, for messages.
    pub fn label(self) -> &'static str {
        match self {
            Format::Text => "plain text",
            Format::Markdown => "Markdown",
            Format::Html => "HTML",
            Format::Pdf => "PDF",
            Format::Docx => "Word (.docx)",
        }
    }
}

/// Bounds on the work one file may cause.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted upload.
    pub max_input_bytes: usize,
    /// Largest accepted extracted text.
    pub max_text_bytes: usize,
    /// Most bytes a compressed container (DOCX parts, PDF page content) may
    /// inflate to, all parts together.
    pub max_uncompressed_bytes: u64,
    /// Most pages a PDF may have.
    pub max_pdf_pages: usize,
    /// Longest a PDF's text may take to read (see [`pdf`]).
    pub max_pdf_time: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_input_bytes: 64 * 1024 * 1024,
            max_text_bytes: 32 * 1024 * 1024,
            max_uncompressed_bytes: 256 * 1024 * 1024,
            max_pdf_pages: 2000,
            max_pdf_time: std::time::Duration::from_secs(60),
        }
    }
}

/// A file's text, in the Markdown-style shape described in the module docs.
#[derive(Debug, Clone)]
pub struct Extracted {
    pub format: Format,
    pub text: String,
    /// The document's own title: HTML `<title>`, a DOCX Title paragraph,
    /// the PDF Info title, else the first top-level heading.
    pub title: Option<String>,
}

/// Why a file yielded no text. Messages are written for the person who
/// uploaded the file.
#[derive(Debug, Error)]
pub enum ExtractError {
    #[error("the file is empty or contains only whitespace")]
    Empty,
    #[error("{what} is too large ({}; the limit is {})", human_bytes(*size), human_bytes(*limit))]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("the PDF has {pages} pages; at most {limit} pages are accepted")]
    TooManyPages { pages: usize, limit: usize },
    /// A container whose shape suggests a decompression bomb.
    #[error("the {} file was refused: {reason}", format.label())]
    Refused { format: Format, reason: String },
    #[error("reading the {} file's text took longer than {} s, so it was given up; \
             it may use features that make it very slow to read", format.label(), seconds)]
    TooSlow { format: Format, seconds: u64 },
    #[error("the {} reader is still busy with earlier files that took too long; \
             upload this one again later", format.label())]
    ReaderBusy { format: Format },
    #[error(
        "unsupported file type: {what}. Supported types are plain text, Markdown, HTML, PDF and Word (.docx)"
    )]
    Unsupported { what: String },
    #[error("the {} file is damaged and cannot be read: {reason}", format.label())]
    Corrupt { format: Format, reason: String },
    #[error("the {} file is password-protected; remove the password and upload it again", format.label())]
    Encrypted { format: Format },
    #[error("{}", no_text_message(*format))]
    NoText { format: Format },
}

impl ExtractError {
    /// A short, stable code for APIs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ExtractError::Empty => "empty",
            ExtractError::TooLarge { .. }
            | ExtractError::TooManyPages { .. }
            | ExtractError::Refused { .. } => "too_large",
            ExtractError::Unsupported { .. } => "unsupported_type",
            ExtractError::Corrupt { .. } => "corrupt",
            ExtractError::Encrypted { .. } => "encrypted",
            ExtractError::TooSlow { .. } => "too_slow",
            ExtractError::ReaderBusy { .. } => "reader_busy",
            ExtractError::NoText { .. } => "no_text",
        }
    }
}

fn no_text_message(format: Format) -> String {
    match format {
        Format::Pdf => "the PDF contains no extractable text; it may be a scanned document, \
                       and text recognition (OCR) is not supported"
            .to_string(),
        other => format!("the {} file contains no text", other.label()),
    }
}

fn human_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if n < 1024 {
        format!("{n} bytes")
    } else if x < KIB * KIB {
        format!("{:.1} KiB", x / KIB)
    } else if x < KIB * KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else {
        format!("{:.1} GiB", x / (KIB * KIB * KIB))
    }
}

/// Decides a file's format from its content, using the name only between
/// text formats. Fails as [`extract`] would for content that is empty,
/// binary, an unsupported container, or contradicts a `.pdf`/`.docx` name.
pub fn detect(bytes: &[u8], file_name: &str) -> Result<Format, ExtractError> {
    sniff(bytes, file_name).map(|s| s.format())
}

/// Extracts the text of an uploaded file.
pub fn extract(bytes: &[u8], file_name: &str, limits: &Limits) -> Result<Extracted, ExtractError> {
    if bytes.len() > limits.max_input_bytes {
        return Err(ExtractError::TooLarge {
            what: "the file".into(),
            size: bytes.len() as u64,
            limit: limits.max_input_bytes as u64,
        });
    }
    let sniffed = sniff(bytes, file_name)?;
    let format = sniffed.format();
    tracing::debug!(
        format = format.as_str(),
        bytes = bytes.len(),
        "extracting text"
    );
    let (raw, title) = match sniffed {
        Sniffed::Pdf => pdf_to_text(bytes, limits)?,
        Sniffed::Docx => docx_to_text(bytes, limits)?,
        Sniffed::Text { format, text } => match format {
            Format::Html => html_to_text(&text, limits.max_text_bytes)?,
            Format::Markdown => {
                let title = markdown_title(&text);
                (text.into_owned(), title)
            }
            _ => (text.into_owned(), None),
        },
    };
    let text = tidy(&raw);
    drop(raw);
    if text.len() > limits.max_text_bytes {
        return Err(text_too_large(text.len(), limits));
    }
    if !text.chars().any(|c| !c.is_whitespace()) {
        return Err(match format {
            Format::Text | Format::Markdown => ExtractError::Empty,
            other => ExtractError::NoText { format: other },
        });
    }
    Ok(Extracted {
        format,
        text,
        title: title.as_deref().and_then(clean_title),
    })
}

fn text_too_large(size: usize, limits: &Limits) -> ExtractError {
    ExtractError::TooLarge {
        what: "the extracted text".into(),
        size: size as u64,
        limit: limits.max_text_bytes as u64,
    }
}

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

fn head(b: &[u8], n: usize) -> &[u8] {
    b.get(..n).unwrap_or(b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Runs a third-party parser, turning a panic into `None`.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Normalises extracted text to the module's output invariants.
fn tidy(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut line = String::new();
    let mut blank_pending = false;
    let mut emit = |line: &mut String, out: &mut String, blank_after: bool| {
        let content = line.trim_end();
        if content.is_empty() {
            blank_pending |= !out.is_empty();
        } else {
            if !out.is_empty() {
                out.push_str(if blank_pending { "\n\n" } else { "\n" });
            }
            out.push_str(content);
            blank_pending = false;
        }
        blank_pending |= blank_after && !out.is_empty();
        line.clear();
    };
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => emit(&mut line, &mut out, false),
            '\r' => {
                chars.next_if_eq(&'\n');
                emit(&mut line, &mut out, false);
            }
            // A form feed is a page break: keep it as a paragraph break.
            '\x0C' => emit(&mut line, &mut out, true),
            '\t' => line.push('\t'),
            '\u{FEFF}' | '\u{00AD}' => {}
            c if c.is_control() => {}
            c => line.push(c),
        }
    }
    emit(&mut line, &mut out, false);
    out
}

fn clean_title(raw: &str) -> Option<String> {
    let words: Vec<&str> = raw.split_whitespace().collect();
    let joined: String = words
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_TITLE_CHARS)
        .collect();
    let title = joined.trim();
    (!title.is_empty()).then(|| title.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Break {
    None,
    Line,
    Paragraph,
}

/// Builds Markdown-style output. Breaks and line prefixes (`- `, `## `) are
/// held until text arrives, so empty elements leave no trace and a break
/// never doubles.
struct MdWriter {
    out: String,
    limit: usize,
    /// Bytes the output would have had without the limit.
    wanted: usize,
    pending_break: Break,
    pending_prefix: String,
    pending_space: bool,
}

impl MdWriter {
    fn new(limit: usize) -> Self {
        MdWriter {
            out: String::new(),
            limit,
            wanted: 0,
            pending_break: Break::None,
            pending_prefix: String::new(),
            pending_space: false,
        }
    }

    fn request_break(&mut self, b: Break) {
        self.pending_break = self.pending_break.max(b);
        self.pending_space = false;
    }

    fn set_prefix(&mut self, prefix: &str) {
        self.pending_prefix.clear();
        self.pending_prefix.push_str(prefix);
    }

    fn space(&mut self) {
        self.pending_space = true;
    }

    fn push(&mut self, s: &str) {
        self.wanted = self.wanted.saturating_add(s.len());
        if self.wanted <= self.limit {
            self.out.push_str(s);
        }
    }

    fn overflowed(&self) -> bool {
        self.wanted > self.limit
    }

    fn flush(&mut self) {
        let mut fresh_line = self.out.is_empty();
        if self.pending_break != Break::None && !self.out.is_empty() {
            let kept = self.out.trim_end_matches([' ', '\t']).len();
            self.out.truncate(kept);
            let have = self.out.len() - self.out.trim_end_matches('\n').len();
            let want = if self.pending_break == Break::Paragraph {
                2
            } else {
                1
            };
            for _ in have.min(2)..want {
                self.push("\n");
            }
            fresh_line = true;
            self.pending_space = false;
        }
        self.pending_break = Break::None;
        if !self.pending_prefix.is_empty() {
            let prefix = std::mem::take(&mut self.pending_prefix);
            self.push(&prefix);
            self.pending_space = false;
        }
        if self.pending_space && !fresh_line && !self.out.ends_with([' ', '\n', '\t']) {
            self.push(" ");
        }
        self.pending_space = false;
    }

    /// Text whose whitespace runs collapse to one space.
    fn text(&mut self, s: &str) {
        let mut rest = s;
        loop {
            let word_start = rest.trim_start_matches(is_html_space);
            if word_start.len() != rest.len() {
                self.pending_space = true;
            }
            if word_start.is_empty() {
                return;
            }
            let end = word_start.find(is_html_space).unwrap_or(word_start.len());
            let (word, after) = word_start.split_at(end);
            self.flush();
            self.push(word);
            rest = after;
        }
    }

    /// Text kept exactly, line breaks included.
    fn raw(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        self.flush();
        self.push(s);
    }

    fn finish(self) -> Result<String, usize> {
        if self.overflowed() {
            Err(self.wanted)
        } else {
            Ok(self.out)
        }
    }
}

fn is_html_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0C' | '\u{A0}')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod fixtures {
    //! Documents built in memory, shared by the tests of every format.

    use std::io::{Cursor, Write};

    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    use super::{extract, ExtractError, Extracted, Limits};

    pub(super) const CONTENT_TYPES: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#;

    pub(super) fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, data) in entries {
            zip.start_file(*name, opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    pub(super) fn docx(body: &str) -> Vec<u8> {
        zip_of(&[
            ("[Content_Types].xml", CONTENT_TYPES.as_bytes()),
            ("word/document.xml", document_xml(body).as_bytes()),
        ])
    }

    pub(super) fn document_xml(body: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main" xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006"><w:body>{body}<w:sectPr/></w:body></w:document>"#
        )
    }

    pub(super) const SAMPLE_BODY: &str = r#"
<w:p><w:pPr><w:pStyle w:val="Title"/></w:pPr><w:r><w:t>Quarterly Report</w:t></w:r></w:p>
<w:p><w:pPr><w:pStyle w:val="Heading2"/></w:pPr><w:r><w:t>Overview</w:t></w:r></w:p>
<w:p><w:r><w:t xml:space="preserve">Sales grew </w:t></w:r><w:r><w:rPr><w:b/></w:rPr><w:t>12%</w:t></w:r><w:r><w:t xml:space="preserve"> &amp; costs fell&#x2026;</w:t></w:r></w:p>
<w:p><w:pPr><w:numPr><w:ilvl w:val="0"/><w:numId w:val="1"/></w:numPr></w:pPr><w:r><w:t>First item</w:t></w:r></w:p>
<w:p><w:pPr><w:numPr><w:ilvl w:val="1"/><w:numId w:val="1"/></w:numPr></w:pPr><w:r><w:t>Nested item</w:t></w:r></w:p>
<w:tbl><w:tblPr/><w:tr><w:tc><w:p><w:r><w:t>Region</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Revenue</w:t></w:r></w:p></w:tc></w:tr>
<w:tr><w:tc><w:p><w:r><w:t>华东</w:t></w:r></w:p><w:p><w:r><w:t>区域</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>100</w:t></w:r></w:p></w:tc></w:tr></w:tbl>
<w:p><w:pPr><w:tabs><w:tab w:val="left" w:pos="720"/></w:tabs></w:pPr><w:r><w:t>中文段落，测试。</w:t></w:r><w:r><w:tab/><w:t>Tabbed</w:t><w:br/><w:t>Next line</w:t></w:r></w:p>
<w:p><w:r><w:delText>deleted words</w:delText></w:r><w:r><w:instrText> PAGE </w:instrText></w:r></w:p>
<w:p><w:r><mc:AlternateContent><mc:Choice Requires="wps"><w:t>box text</w:t></mc:Choice><mc:Fallback><w:t>box text again</w:t></mc:Fallback></mc:AlternateContent></w:r></w:p>
"#;

    /// A docx whose document.xml is one run of `spaces` spaces, written in
    /// pieces so the test never holds the inflated part.
    pub(super) fn spaces_docx(spaces: usize) -> Vec<u8> {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        zip.start_file("[Content_Types].xml", opts).unwrap();
        zip.write_all(CONTENT_TYPES.as_bytes()).unwrap();
        zip.start_file("word/document.xml", opts).unwrap();
        let xml = document_xml("<w:p><w:r><w:t>SPLIT</w:t></w:r></w:p>");
        let (open, close) = xml.split_once("SPLIT").unwrap();
        zip.write_all(open.as_bytes()).unwrap();
        let chunk = vec![b' '; 1 << 20];
        let mut left = spaces;
        while left > 0 {
            let n = left.min(chunk.len());
            zip.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        zip.write_all(close.as_bytes()).unwrap();
        zip.finish().unwrap().into_inner()
    }

    /// Rewrites the uncompressed size that `name`'s local and central
    /// headers declare, as a lying archive would.
    pub(super) fn declare_size(zip: &mut [u8], name: &str, size: u32) {
        let name = name.as_bytes();
        let mut patched = 0;
        for pos in 0..zip.len().saturating_sub(46) {
            let (sig, name_at, size_at) = match &zip[pos..pos + 4] {
                b"PK\x03\x04" => ("local", 30, 22),
                b"PK\x01\x02" => ("central", 46, 24),
                _ => continue,
            };
            let _ = sig;
            if zip.get(pos + name_at..pos + name_at + name.len()) == Some(name) {
                zip[pos + size_at..pos + size_at + 4].copy_from_slice(&size.to_le_bytes());
                patched += 1;
            }
        }
        assert_eq!(patched, 2, "both headers of the entry are patched");
    }

    /// A one-page PDF showing `text` in Helvetica, xref offsets computed.
    pub(super) fn pdf(text: &str, title: Option<&str>, encrypt: bool) -> Vec<u8> {
        let content = format!("BT /F1 24 Tf 72 700 Td ({text}) Tj ET");
        let mut objects = vec![
            "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
             /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_string(),
            format!(
                "<< /Length {} >>\nstream\n{content}\nendstream",
                content.len()
            ),
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
            format!("<< /Title ({}) >>", title.unwrap_or("")),
        ];
        let mut trailer = format!("/Size {} /Root 1 0 R", objects.len() + 1);
        if title.is_some() {
            trailer.push_str(" /Info 6 0 R");
        }
        if encrypt {
            let o = "0".repeat(64);
            let u = "1".repeat(64);
            objects.push(format!(
                "<< /Filter /Standard /V 1 /R 2 /Length 40 /O <{o}> /U <{u}> /P -44 >>"
            ));
            trailer = format!(
                "/Size {} /Root 1 0 R /Encrypt 7 0 R /ID [<00112233445566778899AABBCCDDEEFF> <00112233445566778899AABBCCDDEEFF>]",
                objects.len() + 1
            );
        }
        let mut out: Vec<u8> = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
        let mut offsets = Vec::new();
        for (i, body) in objects.iter().enumerate() {
            offsets.push(out.len());
            out.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
        }
        let xref = out.len();
        out.extend_from_slice(
            format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
        );
        for off in offsets {
            out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(
            format!("trailer\n<< {trailer} >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
        );
        out
    }

    pub(super) fn run(bytes: &[u8], name: &str) -> Result<Extracted, ExtractError> {
        extract(bytes, name, &Limits::default())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;

    use super::fixtures::{docx, run};
    use super::*;

    #[test]
    fn input_over_the_limit_is_too_large() {
        let limits = Limits {
            max_input_bytes: 10,
            ..Limits::default()
        };
        let err = extract(b"more than ten bytes", "a.txt", &limits).unwrap_err();
        assert_eq!(err.code(), "too_large");
        assert_eq!(
            err.to_string(),
            "the file is too large (19 bytes; the limit is 10 bytes)"
        );
    }

    #[test]
    fn extracted_text_over_the_limit_is_too_large() {
        let limits = Limits {
            max_text_bytes: 1000,
            ..Limits::default()
        };
        let body = "<w:p><w:r><w:t>words and more words</w:t></w:r></w:p>".repeat(200);
        let err = extract(&docx(&body), "a.docx", &limits).unwrap_err();
        assert!(matches!(err, ExtractError::TooLarge { .. }), "{err}");
        let html = "<p>words and more words</p>".repeat(200);
        let err = extract(html.as_bytes(), "a.html", &limits).unwrap_err();
        assert!(matches!(err, ExtractError::TooLarge { .. }), "{err}");
        let err = extract("x".repeat(2000).as_bytes(), "a.txt", &limits).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the extracted text is too large"),
            "{err}"
        );
    }

    #[test]
    fn deeply_nested_markup_is_bounded() {
        let body = format!("{}x{}", "<w:p>".repeat(600), "</w:p>".repeat(600));
        let err = run(&docx(&body), "deep.docx").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Corrupt {
                    format: Format::Docx,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("levels deep"), "{err}");

        let html = format!(
            "{}<td>cell</td>{}<p>after</p>",
            "<table><tr>".repeat(200),
            "</table>".repeat(200)
        );
        let (text, _) = html_to_text(&html, usize::MAX).unwrap();
        assert_eq!(tidy(&text), "cell\n\nafter");
    }

    // --- properties --------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn extract_never_panics(
            prefix in prop::sample::select(vec![
                &b""[..], b"%PDF-1.4\n", b"PK\x03\x04", b"<html>", b"\xFF\xFE", b"\xEF\xBB\xBF",
            ]),
            body in prop::collection::vec(any::<u8>(), 0..2048),
            name in prop::sample::select(vec!["", "a.pdf", "a.docx", "a.html", "a.md", "a.txt"]),
        ) {
            let mut bytes = prefix.to_vec();
            bytes.extend(body);
            let _ = extract(&bytes, name, &Limits::default());
        }
    }
}

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

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::{Reader, XmlVersion};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zip::result::ZipError;
use zip::ZipArchive;

/// A ZIP with more entries than this is refused before any is read.
const MAX_ZIP_ENTRIES: usize = 10_000;
/// An entry may inflate to this many times its compressed size...
const MAX_COMPRESSION_RATIO: u64 = 200;
/// ...once it is past this size; small XML parts often compress further.
const RATIO_FREE_BYTES: u64 = 8 * 1024 * 1024;
/// How far into a text file HTML markers are looked for.
const SNIFF_BYTES: usize = 1024;
/// Titles longer than this are cut (in characters).
const MAX_TITLE_CHARS: usize = 300;
/// Deeper XML is refused: real Word documents nest a few dozen levels, and
/// the parser keeps every open element in memory.
const MAX_XML_DEPTH: usize = 512;
/// HTML tables nested deeper than this are read as plain content.
const MAX_HTML_TABLE_DEPTH: usize = 64;

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_input_bytes: 64 * 1024 * 1024,
            max_text_bytes: 32 * 1024 * 1024,
            max_uncompressed_bytes: 256 * 1024 * 1024,
            max_pdf_pages: 2000,
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
// Detection
// ---------------------------------------------------------------------------

enum Sniffed<'a> {
    Pdf,
    Docx,
    Text { format: Format, text: Cow<'a, str> },
}

impl Sniffed<'_> {
    fn format(&self) -> Format {
        match self {
            Sniffed::Pdf => Format::Pdf,
            Sniffed::Docx => Format::Docx,
            Sniffed::Text { format, .. } => *format,
        }
    }
}

const HTML_EXTENSIONS: &[&str] = &["html", "htm", "xhtml", "shtml"];
const MARKDOWN_EXTENSIONS: &[&str] = &["md", "markdown", "mdown", "mkd", "mkdn"];
/// Names whose content stays plain text even when it looks like HTML.
const PLAIN_EXTENSIONS: &[&str] = &[
    "txt", "text", "log", "csv", "tsv", "json", "jsonl", "xml", "yaml", "yml", "toml", "ini",
    "cfg", "conf", "rst", "adoc", "tex", "srt", "vtt",
];

fn sniff<'a>(bytes: &'a [u8], file_name: &str) -> Result<Sniffed<'a>, ExtractError> {
    if bytes.is_empty() {
        return Err(ExtractError::Empty);
    }
    let ext = extension(file_name);
    let ext = ext.as_str();

    if is_pdf(bytes, ext) {
        return Ok(Sniffed::Pdf);
    }
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return sniff_zip(bytes, ext);
    }
    if bytes.starts_with(b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1") {
        return Err(sniff_ole(bytes, ext));
    }
    if let Some(kind) = binary_kind(bytes) {
        return Err(named_elsewhere(format!("binary data ({kind})"), ext));
    }
    if bytes.starts_with(b"{\\rtf") {
        return Err(named_elsewhere(
            "an RTF document; save it as .docx or plain text and upload it again".into(),
            ext,
        ));
    }

    let text = decode_text(bytes).map_err(|what| named_elsewhere(what, ext))?;
    if text.trim().is_empty() {
        return Err(ExtractError::Empty);
    }
    match ext {
        "pdf" => {
            return Err(ExtractError::Corrupt {
                format: Format::Pdf,
                reason: "the file is named .pdf but holds text, not a PDF".into(),
            })
        }
        "docx" => {
            return Err(ExtractError::Corrupt {
                format: Format::Docx,
                reason: "the file is named .docx but holds text, not a Word document".into(),
            })
        }
        _ => {}
    }

    let html = html_signal(&text);
    let format = if HTML_EXTENSIONS.contains(&ext) || html == HtmlSignal::Strong {
        Format::Html
    } else if MARKDOWN_EXTENSIONS.contains(&ext) {
        Format::Markdown
    } else if PLAIN_EXTENSIONS.contains(&ext) {
        Format::Text
    } else if html == HtmlSignal::Weak {
        Format::Html
    } else if ext.is_empty() && has_markdown_heading(&text) {
        Format::Markdown
    } else {
        Format::Text
    };
    Ok(Sniffed::Text { format, text })
}

/// The lower-cased extension of the last path component, or "".
fn extension(file_name: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or(file_name);
    match base.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => ext.to_ascii_lowercase(),
        _ => String::new(),
    }
}

fn is_pdf(bytes: &[u8], ext: &str) -> bool {
    let start = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = start.trim_ascii_start();
    if start.starts_with(b"%PDF-") {
        return true;
    }
    // Some producers put junk before the header; readers allow it in the
    // first kilobyte, and so do we when the name agrees.
    ext == "pdf" && find(head(bytes, SNIFF_BYTES), b"%PDF-").is_some()
}

/// An Unsupported error, noting when the name claimed a document format.
fn named_elsewhere(what: String, ext: &str) -> ExtractError {
    let what = match ext {
        "pdf" | "docx" => format!("{what} (although the file is named .{ext})"),
        _ => what,
    };
    ExtractError::Unsupported { what }
}

fn sniff_zip<'a>(bytes: &[u8], ext: &str) -> Result<Sniffed<'a>, ExtractError> {
    let names: Option<Vec<String>> = guarded(|| {
        ZipArchive::new(Cursor::new(bytes))
            .ok()
            .map(|a| a.file_names().map(str::to_owned).collect())
    })
    .flatten();
    let Some(names) = names else {
        if ext == "docx" || find(bytes, b"word/document.xml").is_some() {
            return Err(ExtractError::Corrupt {
                format: Format::Docx,
                reason: "its ZIP container is truncated or damaged".into(),
            });
        }
        return Err(named_elsewhere("a damaged ZIP archive".into(), ext));
    };
    let has = |n: &str| names.iter().any(|x| x == n);
    if has("word/document.xml") {
        return Ok(Sniffed::Docx);
    }
    let what = if has("xl/workbook.xml") {
        "an Excel spreadsheet (.xlsx)"
    } else if has("ppt/presentation.xml") {
        "a PowerPoint presentation (.pptx)"
    } else if has("META-INF/container.xml") {
        "an EPUB e-book"
    } else if has("content.xml") && has("META-INF/manifest.xml") {
        "an OpenDocument file (.odt, .ods or .odp); save it as .docx and upload it again"
    } else if has("[Content_Types].xml") {
        "an Office document other than Word"
    } else if has("META-INF/MANIFEST.MF") {
        "a Java archive"
    } else {
        "a ZIP archive; upload the documents inside it one by one"
    };
    Err(named_elsewhere(what.into(), ext))
}

/// An OLE compound file: legacy Office binaries, and also the wrapper that
/// password-protected .docx/.xlsx files are stored in.
fn sniff_ole(bytes: &[u8], ext: &str) -> ExtractError {
    let encrypted_package: Vec<u8> = "EncryptedPackage"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let other_office = matches!(ext, "xlsx" | "xls" | "pptx" | "ppt");
    if !other_office && find(bytes, &encrypted_package).is_some() {
        return ExtractError::Encrypted {
            format: Format::Docx,
        };
    }
    let what = match ext {
        "doc" | "docx" => "a legacy Word document (.doc); save it as .docx and upload it again",
        "xls" => "a legacy Excel spreadsheet (.xls)",
        "ppt" => "a legacy PowerPoint presentation (.ppt)",
        "msg" => "an Outlook message (.msg)",
        _ => {
            "a legacy Microsoft Office file (.doc, .xls or .ppt); \
             save Word documents as .docx and upload them again"
        }
    };
    ExtractError::Unsupported { what: what.into() }
}

/// Names a binary type from its magic number.
fn binary_kind(b: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| b.get(offset..).is_some_and(|s| s.starts_with(magic));
    let kind = if at(0, b"\x89PNG\r\n\x1a\n") {
        "PNG image"
    } else if at(0, b"\xFF\xD8\xFF") {
        "JPEG image"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "GIF image"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "WebP image"
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        "WAV audio"
    } else if at(0, b"RIFF") && at(8, b"AVI ") {
        "AVI video"
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        "TIFF image"
    } else if at(4, b"ftyp") {
        "MP4, QuickTime or HEIF media"
    } else if at(0, b"ID3") {
        "MP3 audio"
    } else if at(0, b"OggS") {
        "Ogg media"
    } else if at(0, b"fLaC") {
        "FLAC audio"
    } else if at(0, b"\x7fELF") {
        "ELF executable"
    } else if at(0, b"MZ") && head(b, 64).contains(&0) {
        "Windows executable"
    } else if at(0, b"\xCF\xFA\xED\xFE") || at(0, b"\xFE\xED\xFA\xCF") || at(0, b"\xCA\xFE\xBA\xBE")
    {
        "Mach-O executable or Java class"
    } else if at(0, b"\0asm") {
        "WebAssembly module"
    } else if at(0, b"\x1F\x8B") {
        "gzip archive"
    } else if at(0, b"BZh") && at(4, b"1AY&SY") {
        "bzip2 archive"
    } else if at(0, b"\xFD7zXZ\0") {
        "xz archive"
    } else if at(0, b"\x28\xB5\x2F\xFD") {
        "Zstandard archive"
    } else if at(0, b"7z\xBC\xAF\x27\x1C") {
        "7-Zip archive"
    } else if at(0, b"Rar!\x1A\x07") {
        "RAR archive"
    } else if at(257, b"ustar") {
        "tar archive"
    } else if at(0, b"SQLite format 3\0") {
        "SQLite database"
    } else if at(0, b"wOFF") || at(0, b"wOF2") {
        "web font"
    } else {
        return None;
    };
    Some(kind)
}

/// Decodes text: UTF-8 (BOM stripped) or UTF-16 with a BOM. A few invalid
/// UTF-8 bytes become U+FFFD; more than that, or binary-looking content, is
/// refused with a description of what it looks like.
fn decode_text(bytes: &[u8]) -> Result<Cow<'_, str>, String> {
    const BINARY: &str = "binary data (not a text file or a supported document)";
    if let Some(rest) = bytes.strip_prefix(b"\xFF\xFE") {
        return utf16(rest, u16::from_le_bytes).ok_or_else(|| BINARY.to_string());
    }
    if let Some(rest) = bytes.strip_prefix(b"\xFE\xFF") {
        return utf16(rest, u16::from_be_bytes).ok_or_else(|| BINARY.to_string());
    }
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);

    let sample = head(bytes, 64 * 1024);
    if sample.contains(&0) {
        return Err(BINARY.into());
    }
    let controls = sample
        .iter()
        .filter(|&&b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r' | 0x0C | 0x1B))
        .count();
    if controls > 8 && controls * 50 > sample.len() {
        return Err(BINARY.into());
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Ok(Cow::Borrowed(text));
    }
    if invalid_utf8_bytes(bytes) * 100 > bytes.len() {
        return Err("text in a character encoding other than UTF-8 or UTF-16 \
                    (for example GBK or Windows-1252); save it as UTF-8 and upload it again"
            .into());
    }
    Ok(String::from_utf8_lossy(bytes))
}

fn utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Option<Cow<'static, str>> {
    let units = bytes.chunks_exact(2).map(|c| unit([c[0], c[1]]));
    let text: String = char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect();
    // NULs mean this was not UTF-16 after all (UTF-32, or binary).
    if text.contains('\0') {
        return None;
    }
    Some(Cow::Owned(text))
}

fn invalid_utf8_bytes(mut bytes: &[u8]) -> usize {
    let mut invalid = 0;
    loop {
        match std::str::from_utf8(bytes) {
            Ok(_) => return invalid,
            Err(e) => {
                let Some(bad) = e.error_len() else {
                    return invalid + bytes.len().saturating_sub(e.valid_up_to());
                };
                invalid += bad;
                bytes = bytes.get(e.valid_up_to() + bad..).unwrap_or_default();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HtmlSignal {
    None,
    /// Starts with markup and has common HTML tags near the top.
    Weak,
    /// Starts with a doctype or an `<html>` element.
    Strong,
}

fn html_signal(text: &str) -> HtmlSignal {
    const TYPICAL: &[&str] = &[
        "<head", "<body", "<div", "<p>", "<p ", "<table", "<title", "<meta", "<h1", "<h2", "<br",
        "<span", "<a href", "<ul", "<ol", "<li", "<section", "<article", "<script", "<style",
        "<link",
    ];
    let lower = head(text.as_bytes(), SNIFF_BYTES).to_ascii_lowercase();
    let mut rest: &[u8] = trim_start_text(&lower);
    // Skip an XML declaration and comments before the first element.
    for _ in 0..16 {
        let close: &[u8] = if rest.starts_with(b"<?") {
            b"?>"
        } else if rest.starts_with(b"<!--") {
            b"-->"
        } else {
            break;
        };
        let Some(end) = find(rest, close) else { break };
        rest = trim_start_text(rest.get(end + close.len()..).unwrap_or_default());
    }
    if rest.starts_with(b"<!doctype html") || rest.starts_with(b"<html") {
        return HtmlSignal::Strong;
    }
    if rest.starts_with(b"<") && TYPICAL.iter().any(|t| find(&lower, t.as_bytes()).is_some()) {
        return HtmlSignal::Weak;
    }
    HtmlSignal::None
}

fn trim_start_text(b: &[u8]) -> &[u8] {
    b.strip_prefix("\u{feff}".as_bytes())
        .unwrap_or(b)
        .trim_ascii_start()
}

fn has_markdown_heading(text: &str) -> bool {
    text.lines().take(200).any(|l| atx_heading(l).is_some())
}

/// The level and text of an ATX heading line (`## Text`).
fn atx_heading(line: &str) -> Option<(usize, &str)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = line.trim_start_matches(' ');
    let level = rest.bytes().take_while(|&b| b == b'#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let after = rest.get(level..)?;
    if !after.starts_with([' ', '\t']) {
        return None;
    }
    let body = after.trim().trim_end_matches('#').trim_end();
    (!body.is_empty()).then_some((level, body))
}

fn markdown_title(text: &str) -> Option<String> {
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        for marker in ["```", "~~~"] {
            if trimmed.starts_with(marker) {
                fence = match fence {
                    Some(open) if open == marker => None,
                    Some(open) => Some(open),
                    None => Some(marker),
                };
            }
        }
        if fence.is_none() {
            if let Some((1, body)) = atx_heading(line) {
                return Some(body.to_string());
            }
        }
    }
    None
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

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

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

fn html_to_text(html: &str, limit: usize) -> Result<(String, Option<String>), ExtractError> {
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

// ---------------------------------------------------------------------------
// DOCX
// ---------------------------------------------------------------------------

type Zip<'a> = ZipArchive<Cursor<&'a [u8]>>;

fn docx_corrupt(reason: impl Into<String>) -> ExtractError {
    ExtractError::Corrupt {
        format: Format::Docx,
        reason: reason.into(),
    }
}

fn docx_to_text(bytes: &[u8], limits: &Limits) -> Result<(String, Option<String>), ExtractError> {
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

// ---------------------------------------------------------------------------
// PDF
// ---------------------------------------------------------------------------

fn pdf_corrupt(reason: impl Into<String>) -> ExtractError {
    ExtractError::Corrupt {
        format: Format::Pdf,
        reason: reason.into(),
    }
}

fn pdf_to_text(bytes: &[u8], limits: &Limits) -> Result<(String, Option<String>), ExtractError> {
    let preflight = match guarded(|| pdf_preflight(bytes, limits)) {
        Some(result) => result?,
        None => {
            tracing::warn!("the PDF reader panicked; reporting the file as damaged");
            return Err(pdf_corrupt("its structure could not be parsed"));
        }
    };
    let pages = match guarded(|| pdf_extract::extract_text_from_mem_by_pages(bytes)) {
        Some(Ok(pages)) => pages,
        // It opened with the empty password for lopdf but not for pdf-extract.
        Some(Err(_)) if preflight.was_encrypted => {
            return Err(ExtractError::Encrypted {
                format: Format::Pdf,
            })
        }
        Some(Err(e)) => return Err(pdf_corrupt(format!("its text could not be read ({e})"))),
        None => {
            tracing::warn!("pdf-extract panicked; reporting the file as damaged");
            return Err(pdf_corrupt(
                "its text could not be read (it uses PDF features the reader does not handle)",
            ));
        }
    };
    let mut text = String::new();
    for page in pages {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&page);
        if text.len() > limits.max_text_bytes {
            return Err(text_too_large(text.len(), limits));
        }
    }
    Ok((text, preflight.title))
}

struct PdfPreflight {
    title: Option<String>,
    /// Encrypted, but readable with the empty user password (a PDF that
    /// restricts only printing or copying).
    was_encrypted: bool,
}

/// Opens the PDF with lopdf (bounded decompression) to refuse what
/// pdf-extract should not be given: encrypted files, too many pages, page
/// content that inflates past the limit.
fn pdf_preflight(bytes: &[u8], limits: &Limits) -> Result<PdfPreflight, ExtractError> {
    let max_inflate = usize::try_from(limits.max_uncompressed_bytes).unwrap_or(usize::MAX);
    let options = lopdf::LoadOptions::with_max_decompressed_size(max_inflate);
    let doc = match lopdf::Document::load_mem_with_options(bytes, options) {
        Ok(doc) => doc,
        Err(lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded { .. })) => {
            return Err(inflate_refused());
        }
        Err(e) => {
            return Err(if find(bytes, b"/Encrypt").is_some() {
                ExtractError::Encrypted {
                    format: Format::Pdf,
                }
            } else {
                pdf_corrupt(e.to_string())
            });
        }
    };
    // lopdf removes /Encrypt once the empty user password opens the file;
    // what remains needs a password we do not have.
    if doc.is_encrypted() {
        return Err(ExtractError::Encrypted {
            format: Format::Pdf,
        });
    }
    let pages = doc.get_pages();
    if pages.len() > limits.max_pdf_pages {
        return Err(ExtractError::TooManyPages {
            pages: pages.len(),
            limit: limits.max_pdf_pages,
        });
    }
    let mut budget = max_inflate;
    for &page in pages.values() {
        match doc.get_page_content_with_limit(page, budget) {
            Ok(content) => budget = budget.saturating_sub(content.len()),
            Err(lopdf::Error::Decompress(lopdf::DecompressError::MemoryLimitExceeded {
                ..
            })) => {
                return Err(inflate_refused());
            }
            // A page lopdf cannot decode is left to pdf-extract to judge.
            Err(_) => {}
        }
    }
    let title = doc
        .trailer
        .get_deref(b"Info", &doc)
        .and_then(lopdf::Object::as_dict)
        .and_then(|info| info.get_deref(b"Title", &doc))
        .and_then(lopdf::decode_text_string)
        .ok();
    Ok(PdfPreflight {
        title,
        was_encrypted: doc.was_encrypted(),
    })
}

fn inflate_refused() -> ExtractError {
    ExtractError::Refused {
        format: Format::Pdf,
        reason:
            "its compressed content expands beyond the size limit (a likely decompression bomb)"
                .into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    use super::*;

    // --- fixtures ----------------------------------------------------------

    const CONTENT_TYPES: &str = r#"<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#;

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for (name, data) in entries {
            zip.start_file(*name, opts).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn docx(body: &str) -> Vec<u8> {
        zip_of(&[
            ("[Content_Types].xml", CONTENT_TYPES.as_bytes()),
            ("word/document.xml", document_xml(body).as_bytes()),
        ])
    }

    fn document_xml(body: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main" xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006"><w:body>{body}<w:sectPr/></w:body></w:document>"#
        )
    }

    /// A docx whose document.xml is one run of `spaces` spaces, written in
    /// pieces so the test never holds the inflated part.
    fn spaces_docx(spaces: usize) -> Vec<u8> {
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
    fn declare_size(zip: &mut [u8], name: &str, size: u32) {
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
    fn pdf(text: &str, title: Option<&str>, encrypt: bool) -> Vec<u8> {
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

    fn run(bytes: &[u8], name: &str) -> Result<Extracted, ExtractError> {
        extract(bytes, name, &Limits::default())
    }

    fn utf16le(s: &str) -> Vec<u8> {
        let mut out = vec![0xFF, 0xFE];
        out.extend(s.encode_utf16().flat_map(u16::to_le_bytes));
        out
    }

    // --- detection ---------------------------------------------------------

    #[test]
    fn detects_by_content_whatever_the_name() {
        let pdf = pdf("Hello PDF world", None, false);
        assert_eq!(detect(&pdf, "notes.txt").unwrap(), Format::Pdf);
        assert_eq!(detect(&pdf, "").unwrap(), Format::Pdf);
        let docx = docx("<w:p><w:r><w:t>x</w:t></w:r></w:p>");
        assert_eq!(detect(&docx, "upload.bin").unwrap(), Format::Docx);
        assert_eq!(detect(&docx, "").unwrap(), Format::Docx);
        let html = b"\xEF\xBB\xBF  <!DOCTYPE HTML><html><p>x</p></html>";
        assert_eq!(detect(html, "page.txt").unwrap(), Format::Html);
        assert_eq!(
            detect(b"<div><p>hello</p></div>", "").unwrap(),
            Format::Html
        );
        assert_eq!(
            detect(
                b"<?xml version=\"1.0\"?>\n<!-- c --><html xmlns=\"x\"></html>",
                "x"
            )
            .unwrap(),
            Format::Html
        );
        assert_eq!(
            detect(b"# Title\n\nbody", "README").unwrap(),
            Format::Markdown
        );
        assert_eq!(
            detect(b"plain words", "notes.md").unwrap(),
            Format::Markdown
        );
        assert_eq!(
            detect(b"<p>kept as text</p>", "notes.txt").unwrap(),
            Format::Text
        );
        assert_eq!(detect(b"just text", "page.html").unwrap(), Format::Html);
        assert_eq!(detect(b"just text", "").unwrap(), Format::Text);
        assert_eq!(
            detect(b"# not markdown here", "script.sh").unwrap(),
            Format::Text
        );
    }

    #[test]
    fn a_name_promising_a_document_is_checked_against_the_content() {
        let err = detect(b"hello, I am text", "report.pdf").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Corrupt {
                    format: Format::Pdf,
                    ..
                }
            ),
            "{err}"
        );
        let err = detect(b"hello, I am text", "report.docx").unwrap_err();
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
        let err = detect(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "report.pdf").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("PNG image"), "{err}");
        assert!(err.to_string().contains("named .pdf"), "{err}");
    }

    #[test]
    fn binary_junk_is_unsupported() {
        let err = run(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0", "photo").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("binary data (PNG image)"), "{err}");
        for (bytes, kind) in [
            (&b"\xFF\xD8\xFF\xE0\0\x10JFIF"[..], "JPEG"),
            (b"GIF89a\x01\0\x01\0", "GIF"),
            (b"\x7fELF\x02\x01\x01\0", "ELF"),
            (b"\x1F\x8B\x08\0\0\0\0\0", "gzip"),
        ] {
            let err = detect(bytes, "x.txt").unwrap_err();
            assert!(err.to_string().contains(kind), "{err}");
        }
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let err = run(&junk, "data.txt").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("binary data"), "{err}");
    }

    #[test]
    fn empty_and_whitespace_only_files_are_empty() {
        for bytes in [
            &b""[..],
            b"   \n\t\r\n",
            b"\xEF\xBB\xBF \n",
            &utf16le("  \n"),
        ] {
            let err = run(bytes, "a.txt").unwrap_err();
            assert!(matches!(err, ExtractError::Empty), "{err}");
            assert_eq!(err.code(), "empty");
        }
        let err = run(b"   ", "a.pdf").unwrap_err();
        assert!(matches!(err, ExtractError::Empty), "{err}");
    }

    // --- text --------------------------------------------------------------

    #[test]
    fn text_is_decoded_and_normalised() {
        let out = run(
            b"\xEF\xBB\xBFa  \r\nb\r\rc\n\n\n\nd\x00e\x0cf\t \n",
            "a.txt",
        )
        .unwrap_err();
        // A NUL in the first 64 KiB marks binary data, even with a BOM.
        assert_eq!(out.code(), "unsupported_type");
        let out = run(
            b"\xEF\xBB\xBFa  \r\nb\r\rc\n\n\n\nd\x07e\x0cf\t \n",
            "a.txt",
        )
        .unwrap();
        assert_eq!(out.format, Format::Text);
        assert_eq!(out.text, "a\nb\n\nc\n\nde\n\nf");
        assert_eq!(out.title, None);
    }

    #[test]
    fn utf16_with_a_bom_is_decoded() {
        let text = "Hello 世界\r\nline two";
        let out = run(&utf16le(text), "notes.txt").unwrap();
        assert_eq!(out.text, "Hello 世界\nline two");
        let mut be = vec![0xFE, 0xFF];
        be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(run(&be, "").unwrap().text, "Hello 世界\nline two");
        let html = utf16le("<html><body><h1>Hi</h1></body></html>");
        let out = run(&html, "").unwrap();
        assert_eq!(out.format, Format::Html);
        assert_eq!(out.text, "# Hi");
    }

    #[test]
    fn a_few_bad_utf8_bytes_are_replaced_but_other_encodings_are_refused() {
        let mut latin = b"caf\xE9 ".to_vec();
        latin.extend_from_slice("plain ascii text ".repeat(20).as_bytes());
        let out = run(&latin, "a.txt").unwrap();
        assert!(out.text.starts_with("caf\u{FFFD} plain"), "{}", out.text);
        let gbk = b"\xC4\xE3\xBA\xC3\xA3\xAC\xCA\xC0\xBD\xE7".repeat(20);
        let err = run(&gbk, "a.txt").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn markdown_keeps_its_text_and_takes_the_first_h1_as_title() {
        let md =
            "```\n# not a title\n```\n## Sub\n# Guide #\n\nSome *text*.\r\n\r\n\r\n\r\n- item   \n";
        let out = run(md.as_bytes(), "guide.md").unwrap();
        assert_eq!(out.format, Format::Markdown);
        assert_eq!(out.title.as_deref(), Some("Guide"));
        assert_eq!(
            out.text,
            "```\n# not a title\n```\n## Sub\n# Guide #\n\nSome *text*.\n\n- item"
        );
    }

    // --- HTML --------------------------------------------------------------

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

    // --- DOCX --------------------------------------------------------------

    const SAMPLE_BODY: &str = r#"
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
    fn other_zips_are_unsupported_and_broken_ones_corrupt() {
        let plain = zip_of(&[("notes/a.txt", b"hello"), ("b.csv", b"1,2")]);
        let err = run(&plain, "archive.zip").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("a ZIP archive"), "{err}");

        let xlsx = zip_of(&[
            ("[Content_Types].xml", b"<Types/>"),
            ("xl/workbook.xml", b"<w/>"),
        ]);
        let err = run(&xlsx, "sheet.docx").unwrap_err();
        assert!(err.to_string().contains("Excel spreadsheet"), "{err}");
        assert!(err.to_string().contains("named .docx"), "{err}");

        let whole = docx(SAMPLE_BODY);
        let truncated = &whole[..whole.len() / 2];
        for name in ["report.docx", ""] {
            let err = run(truncated, name).unwrap_err();
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
            assert_eq!(err.code(), "corrupt");
        }

        let bad_xml = zip_of(&[(
            "word/document.xml",
            b"<w:document><w:body><w:p>\xFF\xFE</w:p>",
        )]);
        let err = run(&bad_xml, "").unwrap_err();
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
    }

    #[test]
    fn office_binaries_are_encrypted_or_legacy() {
        let mut ole = b"\xD0\xCF\x11\xE0\xA1\xB1\x1A\xE1".to_vec();
        ole.extend_from_slice(&[0; 64]);
        let mut encrypted = ole.clone();
        encrypted.extend("EncryptedPackage".encode_utf16().flat_map(u16::to_le_bytes));
        let err = run(&encrypted, "secret.docx").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Encrypted {
                    format: Format::Docx
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("password-protected"), "{err}");
        let err = run(&ole, "old.doc").unwrap_err();
        assert_eq!(err.code(), "unsupported_type");
        assert!(err.to_string().contains("legacy Word document"), "{err}");
    }

    // --- PDF ---------------------------------------------------------------

    #[test]
    fn a_hand_written_pdf_extracts() {
        let bytes = pdf("Hello PDF world", Some("A Test Title"), false);
        let out = run(&bytes, "doc.pdf").unwrap();
        assert_eq!(out.format, Format::Pdf);
        assert_eq!(out.text, "Hello PDF world");
        assert_eq!(out.title.as_deref(), Some("A Test Title"));
    }

    #[test]
    fn pdf_page_limit_is_enforced() {
        let limits = Limits {
            max_pdf_pages: 0,
            ..Limits::default()
        };
        let err = extract(&pdf("x", None, false), "a.pdf", &limits).unwrap_err();
        assert!(
            matches!(err, ExtractError::TooManyPages { pages: 1, limit: 0 }),
            "{err}"
        );
        assert_eq!(err.code(), "too_large");
    }

    #[test]
    fn an_encrypted_pdf_is_reported_as_such() {
        let err = run(&pdf("Secret", None, true), "secret.pdf").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::Encrypted {
                    format: Format::Pdf
                }
            ),
            "{err}"
        );
        assert_eq!(err.code(), "encrypted");
    }

    #[test]
    fn broken_pdfs_are_corrupt_not_panics() {
        let whole = pdf("Hello PDF world", None, false);
        let mut garbage = b"%PDF-1.4\n".to_vec();
        garbage.extend((0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8));
        for bytes in [&whole[..40], &garbage[..], b"%PDF-1.7\n%%EOF\n", b"%PDF-"] {
            let err = run(bytes, "x.pdf").unwrap_err();
            assert!(
                matches!(
                    err,
                    ExtractError::Corrupt {
                        format: Format::Pdf,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn a_pdf_without_text_says_ocr_is_not_supported() {
        let bytes = pdf("", None, false);
        let err = run(&bytes, "scan.pdf").unwrap_err();
        assert!(
            matches!(
                err,
                ExtractError::NoText {
                    format: Format::Pdf
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("OCR"), "{err}");
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

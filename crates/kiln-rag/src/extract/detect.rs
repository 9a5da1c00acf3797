//! Content sniffing and text decoding: which [`Format`] a file is, decided
//! from magic numbers, the text encoding and markup markers, the name only
//! breaking ties between text formats; and the decoded text of text files.

use std::borrow::Cow;
use std::io::Cursor;

use zip::ZipArchive;

use super::{find, guarded, head, ExtractError, Format};

/// How far into a text file HTML markers are looked for.
const SNIFF_BYTES: usize = 1024;

pub(super) enum Sniffed<'a> {
    Pdf,
    Docx,
    Text { format: Format, text: Cow<'a, str> },
}

impl Sniffed<'_> {
    pub(super) fn format(&self) -> Format {
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

pub(super) fn sniff<'a>(bytes: &'a [u8], file_name: &str) -> Result<Sniffed<'a>, ExtractError> {
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

pub(super) fn markdown_title(text: &str) -> Option<String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::extract::detect;
    use crate::extract::fixtures::{docx, pdf, run, zip_of, SAMPLE_BODY};

    use super::*;

    fn utf16le(s: &str) -> Vec<u8> {
        let mut out = vec![0xFF, 0xFE];
        out.extend(s.encode_utf16().flat_map(u16::to_le_bytes));
        out
    }

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
}

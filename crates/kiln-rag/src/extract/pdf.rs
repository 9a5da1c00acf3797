//! PDF to text. lopdf opens the file first, with bounded decompression, to
//! refuse encrypted files, too many pages and page content that inflates
//! past the limit; only then is pdf-extract given it, one page a paragraph.
//! Both run under `catch_unwind`. Scanned PDFs have no text: there is no OCR.
//!
//! pdf-extract runs on a thread of its own with a deadline
//! ([`Limits::max_pdf_time`]): a file that takes longer fails as `too_slow`.
//! A reader past its deadline cannot be stopped safely, so it is left to
//! finish in the background (its work is bounded by the page and inflation
//! limits above); while [`MAX_OVERDUE_READERS`] of them still run, further
//! PDFs fail at once as `reader_busy` instead of piling up more.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use super::{find, guarded, text_too_large, ExtractError, Format, Limits};

/// Readers still running past their deadline.
static OVERDUE_READERS: AtomicUsize = AtomicUsize::new(0);

/// Overdue readers left running before new PDFs are turned away.
pub const MAX_OVERDUE_READERS: usize = 2;

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

fn pdf_corrupt(reason: impl Into<String>) -> ExtractError {
    ExtractError::Corrupt {
        format: Format::Pdf,
        reason: reason.into(),
    }
}

pub(super) fn pdf_to_text(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(String, Option<String>), ExtractError> {
    let preflight = match guarded(|| pdf_preflight(bytes, limits)) {
        Some(result) => result?,
        None => {
            tracing::warn!("the PDF reader panicked; reporting the file as damaged");
            return Err(pdf_corrupt("its structure could not be parsed"));
        }
    };
    let pages = match read_pages(bytes, limits)? {
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

type Pages = Result<Vec<String>, pdf_extract::OutputError>;

/// pdf-extract's pages (`None` if it panicked), read on a thread of its own
/// within `limits.max_pdf_time` (see the module docs).
fn read_pages(bytes: &[u8], limits: &Limits) -> Result<Option<Pages>, ExtractError> {
    let bytes = bytes.to_vec();
    read_within(&OVERDUE_READERS, limits.max_pdf_time, move || {
        pdf_extract::extract_text_from_mem_by_pages(&bytes)
    })
}

/// Runs `read` on its own thread, waiting up to `limit`; `overdue` counts
/// the readers of its kind left running past their deadline.
fn read_within<T: Send + 'static>(
    overdue: &'static AtomicUsize,
    limit: std::time::Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>, ExtractError> {
    let busy = ExtractError::ReaderBusy {
        format: Format::Pdf,
    };
    if overdue.load(Ordering::Acquire) >= MAX_OVERDUE_READERS {
        return Err(busy);
    }
    let state = Arc::new(AtomicU8::new(RUNNING));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let reader_state = state.clone();
    let spawned = std::thread::Builder::new()
        .name("kiln-pdf-reader".into())
        .spawn(move || {
            let result = guarded(read);
            let finished =
                reader_state.compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire);
            if finished.is_ok() {
                let _ = tx.send(result);
            } else {
                // Given up on while it ran: no longer overdue.
                overdue.fetch_sub(1, Ordering::AcqRel);
            }
        });
    if spawned.is_err() {
        return Err(busy);
    }
    match rx.recv_timeout(limit) {
        Ok(result) => Ok(result),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            // Counted before it is marked, so the reader's decrement (once
            // it sees the mark) always comes after this increment.
            overdue.fetch_add(1, Ordering::AcqRel);
            let gave_up =
                state.compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
            if gave_up.is_ok() {
                tracing::warn!(
                    seconds = limit.as_secs(),
                    "a PDF took too long to read; its reader is left to finish in the background"
                );
                return Err(ExtractError::TooSlow {
                    format: Format::Pdf,
                    seconds: limit.as_secs(),
                });
            }
            // It finished just as time ran out: its result is on its way.
            overdue.fetch_sub(1, Ordering::AcqRel);
            Ok(rx.recv().ok().flatten())
        }
        // The thread ended without a word: it can only have panicked.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(None),
    }
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
    use crate::extract::extract;

    #[test]
    fn a_reader_past_its_deadline_is_given_up_and_bounded() {
        use super::{read_within, MAX_OVERDUE_READERS};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::Duration;
        static OVERDUE: AtomicUsize = AtomicUsize::new(0);
        let quick = read_within(&OVERDUE, Duration::from_secs(5), || 7).unwrap();
        assert_eq!(quick, Some(7));
        let slow = || {
            std::thread::sleep(Duration::from_millis(400));
            7
        };
        for _ in 0..MAX_OVERDUE_READERS {
            let err = read_within(&OVERDUE, Duration::from_millis(20), slow).unwrap_err();
            assert_eq!(err.code(), "too_slow", "{err}");
        }
        assert_eq!(OVERDUE.load(Ordering::Acquire), MAX_OVERDUE_READERS);
        // While they still run, the next file is turned away at once.
        let err = read_within(&OVERDUE, Duration::from_secs(5), || 7).unwrap_err();
        assert_eq!(err.code(), "reader_busy", "{err}");
        // Once they finish, files are read again.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while OVERDUE.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the slow readers never ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            read_within(&OVERDUE, Duration::from_secs(5), || 7).unwrap(),
            Some(7)
        );
        // A reader that panics is reported as such, not as a timeout.
        let panicked = read_within(&OVERDUE, Duration::from_secs(5), || -> u8 {
            panic!("a reader bug")
        });
        assert_eq!(panicked.unwrap(), None);
    }
    use crate::extract::fixtures::{pdf, run};

    use super::*;

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
}

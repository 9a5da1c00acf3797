//! Code point classification and the GPT-2 byte-to-character mapping.
//!
//! Owns the character classes the pre-tokenizers test (`\p{L}`, `\p{N}`,
//! `\s`, ...) with llama.cpp's definitions: the general-category group
//! from Unicode 15.1 (see `unicode_tables.rs`), and `\s` as the Unicode
//! `White_Space` property. Every in-range code point has at least one bit
//! set (unassigned ones have `UNASSIGNED`); only "past the end of the
//! piece" reads as [`CharClass::NONE`], which the splitters rely on.

use super::unicode_tables::CATEGORY_RANGES;

/// Bit set of a code point's category group plus the white-space property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) struct CharClass(u16);

impl CharClass {
    pub const NONE: CharClass = CharClass(0);
    const UNASSIGNED: u16 = 0x01;
    const NUMBER: u16 = 0x02;
    const LETTER: u16 = 0x04;
    const MARK: u16 = 0x10;
    const PUNCTUATION: u16 = 0x20;
    const WHITESPACE: u16 = 0x100;

    pub fn of(cp: u32) -> CharClass {
        let group = category_group(cp);
        let ws = if is_white_space(cp) {
            Self::WHITESPACE
        } else {
            0
        };
        CharClass(u16::from(group) | ws)
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
    pub fn letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    pub fn number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    pub fn mark(self) -> bool {
        self.0 & Self::MARK != 0
    }
    pub fn punctuation(self) -> bool {
        self.0 & Self::PUNCTUATION != 0
    }
    pub fn whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
    #[cfg(test)]
    pub fn unassigned(self) -> bool {
        self.0 & Self::UNASSIGNED != 0
    }
}

fn category_group(cp: u32) -> u8 {
    if cp >= 0x11_0000 {
        return CharClass::UNASSIGNED as u8;
    }
    // Last range whose start is <= cp; the table starts at 0 so idx >= 1.
    let idx = CATEGORY_RANGES.partition_point(|&(start, _)| start <= cp);
    match idx.checked_sub(1).and_then(|i| CATEGORY_RANGES.get(i)) {
        Some(&(_, group)) => group,
        None => CharClass::UNASSIGNED as u8,
    }
}

/// Unicode `White_Space` (PropList.txt): what llama.cpp treats as `\s`.
/// Note that U+001C..U+001F are *not* white space here (unlike Python).
fn is_white_space(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

/// GPT-2's reversible byte <-> character map: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order.
pub(super) struct ByteChars {
    to_char: [char; 256],
    /// `extra[i]` is the byte drawn as U+0100 + i.
    extra: [u8; 68],
}

impl ByteChars {
    pub fn new() -> ByteChars {
        let mut to_char = ['\0'; 256];
        let mut extra = [0u8; 68];
        let mut n_extra = 0usize;
        for b in 0u8..=255 {
            let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let cp = if printable {
                u32::from(b)
            } else {
                if let Some(slot) = extra.get_mut(n_extra) {
                    *slot = b;
                }
                n_extra += 1;
                0x100 + n_extra as u32 - 1
            };
            to_char[usize::from(b)] = char::from_u32(cp).unwrap_or('\u{FFFD}');
        }
        ByteChars { to_char, extra }
    }

    pub fn char_of(&self, byte: u8) -> char {
        self.to_char[usize::from(byte)]
    }

    /// The byte a character stands for, if it is one of the 256.
    pub fn byte_of(&self, c: char) -> Option<u8> {
        let cp = c as u32;
        match cp {
            0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => u8::try_from(cp).ok(),
            0x100..=0x143 => self.extra.get((cp - 0x100) as usize).copied(),
            _ => None,
        }
    }

    /// Appends the byte-level spelling of `text` (each UTF-8 byte as its char).
    pub fn encode_into(&self, text: &str, out: &mut String) {
        for &b in text.as_bytes() {
            out.push(self.char_of(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_match_llama_cpp_groups() {
        assert!(CharClass::of('a' as u32).letter());
        assert!(CharClass::of('7' as u32).number());
        assert!(CharClass::of('½' as u32).number());
        assert!(CharClass::of('中' as u32).letter());
        assert!(CharClass::of(0x20000).letter()); // CJK ext-B (a UCD range)
        assert!(CharClass::of(0x0301).mark());
        assert!(CharClass::of('!' as u32).punctuation());
        assert!(!CharClass::of('$' as u32).punctuation());
        assert!(CharClass::of(0x0378).unassigned());
        assert!(!CharClass::of(0xE000).unassigned()); // private use is "C"
        assert!(CharClass::of(0x3000).whitespace());
        assert!(!CharClass::of(0x1C).whitespace());
        assert!(!CharClass::of(0x0378).is_none());
    }

    #[test]
    fn byte_chars_round_trip() {
        let bc = ByteChars::new();
        assert_eq!(bc.char_of(b' '), 'Ġ');
        assert_eq!(bc.char_of(b'\n'), 'Ċ');
        assert_eq!(bc.char_of(b'a'), 'a');
        for b in 0u8..=255 {
            assert_eq!(bc.byte_of(bc.char_of(b)), Some(b));
        }
        assert_eq!(bc.byte_of('中'), None);
    }
}

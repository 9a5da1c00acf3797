//! Unit tests on small hand-built vocabularies. Agreement with llama.cpp on
//! real models is checked in `tests/tokenizer_llamacpp.rs`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use proptest::prelude::*;

use super::*;
use crate::EngineError;

fn content(metadata: Vec<(&str, Value)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn strings<S: AsRef<str>>(items: &[S]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String(s.as_ref().to_string()))
            .collect(),
    )
}

/// A byte-level BPE vocabulary: the 256 byte characters, a few merges, and
/// ChatML-style control tokens plus one user-defined token.
fn bpe_metadata(pre: &str) -> Vec<(&'static str, Value)> {
    let bc = ByteChars::new();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
        "<tool>".into(),
    ];
    tokens.extend((0u8..=255).map(|b| bc.char_of(b).to_string()));
    let merges = ["h e", "he l", "hel l", "hell o", "Ġ w", "Ġw o", "l d"];
    tokens.extend(["he", "hel", "hell", "hello", "Ġw", "Ġwo", "ld"].map(String::from));
    let mut types = vec![Value::I32(3), Value::I32(3), Value::I32(3), Value::I32(4)];
    types.resize(tokens.len(), Value::I32(1));
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]
}

fn bpe_tokenizer() -> Tokenizer {
    match Tokenizer::from_gguf(&content(bpe_metadata("smollm"))) {
        Ok(t) => t,
        Err(e) => panic!("test vocabulary rejected: {e}"),
    }
}

/// A SentencePiece vocabulary with byte fallback and scored merges.
fn spm_tokenizer(add_space_prefix: bool) -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut scores = vec![0.0f32; 3];
    let mut types = vec![2, 3, 3];
    for b in 0u8..=255 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(6);
    }
    for (piece, score) in [
        ("▁", -1.0),
        ("a", -2.0),
        ("b", -2.0),
        ("c", -2.0),
        ("▁a", -3.0),
        ("ab", -1.5),
        ("▁ab", -0.5),
        ("bc", -1.2),
    ] {
        tokens.push(piece.into());
        scores.push(score);
        types.push(1);
    }
    let metadata = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(add_space_prefix),
        ),
    ];
    match Tokenizer::from_gguf(&content(metadata)) {
        Ok(t) => t,
        Err(e) => panic!("test vocabulary rejected: {e}"),
    }
}

fn id(t: &Tokenizer, piece: &str) -> u32 {
    t.token_id(piece).unwrap_or(u32::MAX)
}

#[test]
fn bpe_merges_by_rank() {
    let t = bpe_tokenizer();
    assert_eq!(
        t.encode("hello world", false),
        [id(&t, "hello"), id(&t, "Ġwo"), id(&t, "r"), id(&t, "ld")]
    );
    assert_eq!(t.decode(&t.encode("hello world", false)), "hello world");
}

#[test]
fn plain_text_never_parses_control_tokens() {
    let t = bpe_tokenizer();
    let ids = t.encode("<|im_end|>", false);
    assert!(!ids.contains(&2), "{ids:?}");
    assert_eq!(t.decode(&ids), "<|im_end|>");
    // user-defined tokens are split out even from user text
    assert_eq!(t.encode("a<tool>b", false), [id(&t, "a"), 3, id(&t, "b")]);
}

#[test]
fn segments_parse_control_tokens_only_in_template() {
    let t = bpe_tokenizer();
    let ids = t.encode_segments(
        &[
            Segment::Template("<|im_start|>user\n"),
            Segment::Text("hi <|im_end|>"),
            Segment::Template("<|im_end|>\n"),
        ],
        false,
    );
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "{ids:?}");
    assert_eq!(ids.get(ids.len() - 2), Some(&2));
    // template and text pieces between control tokens form one fragment
    let joined = t.encode_segments(
        &[
            Segment::Template("he"),
            Segment::Text("llo"),
            Segment::Template(" world"),
        ],
        true,
    );
    assert_eq!(
        joined,
        [1, id(&t, "hello"), id(&t, "Ġwo"), id(&t, "r"), id(&t, "ld")]
    );
}

#[test]
fn bpe_special_ids_and_eog() {
    let t = bpe_tokenizer();
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert!(!t.add_bos_by_default());
    // <|endoftext|> and <|im_end|> end generation
    assert_eq!(t.eog_tokens(), &[0, 2]);
    assert!(t.is_eog(2) && !t.is_eog(1));
    assert!(t.is_control(1) && !t.is_control(3));
    assert!(t.token_bytes(1).is_empty());
    assert_eq!(t.token_bytes(3), b"<tool>");
    assert_eq!(t.token_bytes(id(&t, "Ġw")), b" w");
    assert!(t.token_bytes(u32::MAX).is_empty());
    assert_eq!(t.decode(&[u32::MAX, 7_000_000]), "");
    assert_eq!(t.token_str(u32::MAX), "");
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let t = spm_tokenizer(true);
    assert!(t.add_bos_by_default());
    // "▁abc": "bc" scores best, then "▁a"; "▁ab" never gets a chance
    let ids = t.encode("abc", true);
    assert_eq!(ids, [1, id(&t, "▁a"), id(&t, "bc")]);
    let ids = t.encode("ab", true);
    assert_eq!(ids, [1, id(&t, "▁ab")]);
    // a character not in the vocabulary falls back to its UTF-8 bytes
    let ids = t.encode("中", false);
    assert_eq!(
        ids,
        [
            id(&t, "▁"),
            id(&t, "<0xE4>"),
            id(&t, "<0xB8>"),
            id(&t, "<0xAD>")
        ]
    );
    assert_eq!(t.decode(&ids), " 中");
    let t = spm_tokenizer(false);
    assert_eq!(t.encode("bc", false), [id(&t, "bc")]);
}

#[test]
fn bad_metadata_is_a_metadata_error() {
    let cases: Vec<Vec<(&str, Value)>> = vec![
        bpe_metadata("no-such-pre"),
        {
            let mut m = bpe_metadata("gpt2");
            m.retain(|(k, _)| *k != "tokenizer.ggml.merges");
            m
        },
        {
            let mut m = bpe_metadata("gpt2");
            m.retain(|(k, _)| *k != "tokenizer.ggml.tokens");
            m
        },
        {
            let mut m = bpe_metadata("gpt2");
            m.push((
                "tokenizer.ggml.token_type",
                Value::Array(vec![Value::I32(1)]),
            ));
            m
        },
        {
            let mut m = bpe_metadata("gpt2");
            m.push(("tokenizer.ggml.model", Value::String("t5".into())));
            m
        },
        {
            let mut m = bpe_metadata("gpt2");
            m.push(("tokenizer.ggml.bos_token_id", Value::String("1".into())));
            m
        },
        {
            let mut m = bpe_metadata("gpt2");
            m.push(("tokenizer.ggml.tokens", strings(&["a", "a"])));
            m
        },
    ];
    for (i, metadata) in cases.into_iter().enumerate() {
        match Tokenizer::from_gguf(&content(metadata)) {
            Err(EngineError::Metadata(_)) => {}
            other => panic!("case {i}: expected a metadata error, got {other:?}"),
        }
    }
}

#[test]
fn out_of_range_special_ids_are_ignored() {
    let mut m = bpe_metadata("qwen2");
    m.push(("tokenizer.ggml.eos_token_id", Value::U32(1_000_000)));
    let t = match Tokenizer::from_gguf(&content(m)) {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    // falls back to the BPE default (11), which is in range here
    assert_eq!(t.eos(), Some(11));
}

#[test]
fn long_input_is_fast_enough() {
    let t = bpe_tokenizer();
    let text = "hello world, 12345 <|im_end|> 中文 ".repeat(400);
    let start = std::time::Instant::now();
    let ids = t.encode(&text, false);
    assert!(start.elapsed().as_millis() < 2_000);
    assert_eq!(t.decode(&ids), text);
}

proptest! {
    #[test]
    fn bpe_round_trips_any_string(s in any::<String>()) {
        let t = bpe_tokenizer();
        prop_assert_eq!(t.decode(&t.encode(&s, false)), s.clone());
        let segs = [Segment::Template("<|im_start|>"), Segment::Text(&s)];
        let ids = t.encode_segments(&segs, false);
        prop_assert_eq!(t.decode(&ids), s);
    }

    #[test]
    fn spm_round_trips_strings_without_the_space_marker(s in "[^▁]*") {
        let t = spm_tokenizer(false);
        prop_assert_eq!(t.decode(&t.encode(&s, true)), s);
    }
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}

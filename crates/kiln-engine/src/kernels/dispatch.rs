//! Which instruction-set variant of the kernels runs: chosen once per process
//! from the CPU's features at run time (never from compile-time flags), with
//! `KILN_KERNELS=scalar|avx2|avx512` to force one.
//!
//! Every variant computes bit-identical results (the SIMD code replays the
//! portable code's float order), so the choice only changes speed.

use std::sync::OnceLock;

/// The environment variable that forces a kernel variant.
pub const KERNELS_ENV: &str = "KILN_KERNELS";

/// An instruction-set variant of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelVariant {
    /// Portable Rust; runs everywhere and defines the results.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, VNNI) with AVX2, FMA and F16C.
    Avx512,
}

impl KernelVariant {
    pub const ALL: [KernelVariant; 3] = [
        KernelVariant::Scalar,
        KernelVariant::Avx2,
        KernelVariant::Avx512,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelVariant::Scalar => "scalar",
            KernelVariant::Avx2 => "avx2",
            KernelVariant::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<KernelVariant> {
        KernelVariant::ALL
            .into_iter()
            .find(|v| v.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run the variant.
    pub fn is_available(self) -> bool {
        match self {
            KernelVariant::Scalar => true,
            KernelVariant::Avx2 => has_avx2(),
            KernelVariant::Avx512 => has_avx512(),
        }
    }

    /// The variants this CPU can run, slowest first.
    pub fn available() -> Vec<KernelVariant> {
        KernelVariant::ALL
            .into_iter()
            .filter(|v| v.is_available())
            .collect()
    }

    /// The fastest variant this CPU can run.
    pub fn best() -> KernelVariant {
        KernelVariant::ALL
            .into_iter()
            .rev()
            .find(|v| v.is_available())
            .unwrap_or(KernelVariant::Scalar)
    }

    /// The variant [`super::QMatrix::matmul`] uses: `KILN_KERNELS` if set to
    /// a variant this CPU can run, otherwise the best one. Read once.
    pub fn selected() -> KernelVariant {
        static SELECTED: OnceLock<KernelVariant> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            let chosen = choose(std::env::var(KERNELS_ENV).ok().as_deref());
            tracing::debug!(variant = chosen.name(), "quantized matmul kernels selected");
            chosen
        })
    }
}

/// Resolves a `KILN_KERNELS` value; an unknown or unavailable choice falls
/// back to the best variant, loudly.
fn choose(requested: Option<&str>) -> KernelVariant {
    let best = KernelVariant::best();
    let Some(raw) = requested.filter(|s| !s.trim().is_empty()) else {
        return best;
    };
    match KernelVariant::parse(raw) {
        Some(v) if v.is_available() => v,
        Some(v) => {
            tracing::warn!(
                requested = v.name(),
                using = best.name(),
                "{KERNELS_ENV} asks for kernels this CPU cannot run"
            );
            best
        }
        None => {
            tracing::warn!(
                requested = raw,
                using = best.name(),
                "{KERNELS_ENV} must be one of scalar, avx2, avx512"
            );
            best
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_falls_back() {
        assert_eq!(KernelVariant::parse(" AVX2 "), Some(KernelVariant::Avx2));
        assert_eq!(KernelVariant::parse("neon"), None);
        assert_eq!(choose(None), KernelVariant::best());
        assert_eq!(choose(Some("bogus")), KernelVariant::best());
        assert_eq!(choose(Some("scalar")), KernelVariant::Scalar);
        assert!(KernelVariant::available().contains(&KernelVariant::Scalar));
        assert!(KernelVariant::selected().is_available());
    }
}

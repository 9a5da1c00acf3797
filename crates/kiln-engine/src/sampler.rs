//! Turning a row of logits into the next token.
//!
//! The order of operations follows the common llama.cpp/vLLM pipeline:
//! penalties (repetition, presence, frequency) on the raw logits, then — unless
//! sampling is greedy — temperature, top-k, top-p and min-p, and finally a draw
//! from the renormalised distribution with a per-request RNG (seeded when the
//! caller gives a seed, so equal requests give equal outputs).
//!
//! Log-probabilities reported to clients are those of the model's own
//! distribution after penalties (log-softmax of the penalised logits), as
//! OpenAI reports them, independent of temperature and truncation.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};

/// Sampling settings of one request. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// OpenAI-style additive penalties, -2..=2.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// CTRL-style multiplicative penalty; 1.0 disables it.
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        }
    }

    /// Checks every field against its allowed range, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(EngineError::InvalidRequest(what.to_string()));
        if !self.temperature.is_finite() || !(0.0..=2.0).contains(&self.temperature) {
            return bad("`temperature` must be between 0 and 2");
        }
        if !self.top_p.is_finite() || self.top_p <= 0.0 || self.top_p > 1.0 {
            return bad("`top_p` must be greater than 0 and at most 1");
        }
        if !self.min_p.is_finite() || !(0.0..=1.0).contains(&self.min_p) {
            return bad("`min_p` must be between 0 and 1");
        }
        if !self.presence_penalty.is_finite() || !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("`presence_penalty` must be between -2 and 2");
        }
        if !self.frequency_penalty.is_finite() || !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("`frequency_penalty` must be between -2 and 2");
        }
        if !self.repetition_penalty.is_finite()
            || self.repetition_penalty <= 0.0
            || self.repetition_penalty > 10.0
        {
            return bad("`repetition_penalty` must be greater than 0 and at most 10");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// The sampled token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
    /// `(id, logprob)` of the `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Per-sequence sampler state: settings, RNG and the counts the penalties need.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token has appeared in the context (prompt + output) —
    /// the repetition penalty looks at the whole context.
    seen_in_context: std::collections::HashMap<u32, u32>,
    /// How often each token has been generated — presence/frequency penalties
    /// only look at the output, as OpenAI defines them.
    seen_in_output: std::collections::HashMap<u32, u32>,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let mut seen_in_context = std::collections::HashMap::new();
        if params.repetition_penalty != 1.0 {
            for &t in prompt {
                *seen_in_context.entry(t).or_insert(0) += 1;
            }
        }
        Sampler {
            params,
            rng,
            seen_in_context,
            seen_in_output: std::collections::HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// Records a generated token for the penalties.
    pub fn accept(&mut self, id: u32) {
        *self.seen_in_output.entry(id).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            *self.seen_in_context.entry(id).or_insert(0) += 1;
        }
    }

    /// Picks the next token from `logits` (modified in place by penalties).
    /// `banned` tokens (e.g. end-of-generation when the caller ignores it)
    /// are never chosen. `top_logprobs` alternatives are reported.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        banned: &[u32],
        top_logprobs: usize,
    ) -> SampledToken {
        if self.params.has_penalties() {
            self.apply_penalties(logits);
        }
        for &b in banned {
            if let Some(l) = logits.get_mut(b as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let id = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        let log_norm = log_sum_exp(logits);
        let logprob = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - log_norm);
        let top = if top_logprobs > 0 {
            top_n(logits, top_logprobs)
                .into_iter()
                .map(|(t, l)| (t, l - log_norm))
                .collect()
        } else {
            Vec::new()
        };
        SampledToken { id, logprob, top }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &t in self.seen_in_context.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        for (&t, &n) in &self.seen_in_output {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= self.params.presence_penalty + self.params.frequency_penalty * n as f32;
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let cand = &mut self.scratch;
        cand.clear();
        cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l * inv_t)),
        );
        if cand.is_empty() {
            return argmax(logits);
        }
        // Sort descending; ties broken by id so the order is deterministic.
        let k = if p.top_k > 0 {
            p.top_k.min(cand.len())
        } else {
            cand.len()
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        // min-p: drop tokens less likely than min_p times the most likely one.
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        }
        // top-p: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let mut n = 0;
            for &q in probs.iter().take(keep) {
                mass += q;
                n += 1;
                if mass >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let kept_mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * kept_mass;
        for (i, &q) in probs[..keep].iter().enumerate() {
            if r < q {
                return cand[i].0;
            }
            r -= q;
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit; the lowest index wins ties (llama.cpp's rule).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

/// The `n` largest logits with their ids, largest first.
pub fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(n);
    }
    all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let mut logits = vec![0.0, 3.0, 1.0, 3.0];
        let t = s.sample(&mut logits, &[], 2);
        assert_eq!(t.id, 1, "lowest index wins a tie");
        assert_eq!(t.top.len(), 2);
        assert_eq!(t.top[0].0, 1);
        assert_eq!(t.top[1].0, 3);
        let total: f32 = [0.0f32, 3.0, 1.0, 3.0].iter().map(|l| l.exp()).sum();
        assert!((t.logprob - (3.0 - total.ln())).abs() < 1e-5);
    }

    #[test]
    fn banned_tokens_are_never_chosen() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let mut logits = vec![0.0, 9.0, 1.0];
        assert_eq!(s.sample(&mut logits, &[1], 0).id, 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0), &[]);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[], 0).id)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut p = params(1.5);
        p.top_k = 1;
        let mut s = Sampler::new(p, &[]);
        for _ in 0..20 {
            let mut logits = vec![0.5, 0.1, 0.7, 0.69];
            assert_eq!(s.sample(&mut logits, &[], 0).id, 2);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let mut p = params(1.0);
        p.min_p = 0.5;
        let mut s = Sampler::new(p, &[]);
        for _ in 0..200 {
            // p(0) ≈ 0.73, p(1) ≈ 0.27 < 0.5 * 0.73: only token 0 survives.
            let mut logits = vec![1.0, 0.0, -5.0];
            assert_eq!(s.sample(&mut logits, &[], 0).id, 0);
        }
    }

    #[test]
    fn frequency_penalty_counts_output_only() {
        let mut p = SamplingParams::greedy();
        p.frequency_penalty = 1.0;
        let mut s = Sampler::new(p, &[0, 0, 0]);
        let mut logits = vec![2.0, 1.5];
        assert_eq!(
            s.sample(&mut logits, &[], 0).id,
            0,
            "prompt tokens are not penalised"
        );
        s.accept(0);
        let mut logits = vec![2.0, 1.5];
        assert_eq!(s.sample(&mut logits, &[], 0).id, 1);
    }

    #[test]
    fn repetition_penalty_covers_the_prompt() {
        let mut p = SamplingParams::greedy();
        p.repetition_penalty = 2.0;
        let mut s = Sampler::new(p, &[0]);
        let mut logits = vec![2.0, 1.5];
        assert_eq!(s.sample(&mut logits, &[], 0).id, 1);
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        let err = p
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("top_p"), "{err}");
        p.top_p = 1.0;
        p.temperature = f32::NAN;
        assert!(p.validate().is_err());
    }

    proptest! {
        #[test]
        fn sampled_token_is_always_in_range(
            logits in proptest::collection::vec(-50.0f32..50.0, 1..64),
            t in 0.0f32..2.0, top_p in 0.01f32..1.0, min_p in 0.0f32..1.0, top_k in 0usize..10,
            seed in any::<u64>(),
        ) {
            let p = SamplingParams { temperature: t, top_p, min_p, top_k, seed: Some(seed), ..SamplingParams::default() };
            let mut s = Sampler::new(p, &[]);
            let n = logits.len();
            let t = s.sample(&mut logits.clone(), &[], 3);
            prop_assert!((t.id as usize) < n);
            prop_assert!(t.logprob <= 1e-4);
            prop_assert!(t.top.len() == n.min(3));
        }
    }
}

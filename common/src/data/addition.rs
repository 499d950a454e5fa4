//! The built-in demo task: multi-digit addition. `a+b=` is followed by the sum's digits in reverse order (least
//! significant first, as a person adds), zero-padded: with 2 digits, `07+45=` → `250`. Every line has the same
//! length, so training windows that are a multiple of it start on a problem. Learning is measured by exact-match
//! accuracy on held-out problems the model never saw.
use rand::SeedableRng;
use rand::seq::SliceRandom;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
    pub digits: u32,
}

impl Problem {
    /// `"07+45="`.
    pub fn prompt(&self) -> String {
        let d = self.digits as usize;
        format!("{:0d$}+{:0d$}=", self.a, self.b)
    }

    /// The reversed, zero-padded sum: `"250"` for 7 + 45 = 52 with 2 digits.
    pub fn answer(&self) -> String {
        let d = self.digits as usize + 1;
        format!("{:0d$}", self.a + self.b).chars().rev().collect()
    }

    /// The training line: prompt, answer, newline.
    pub fn line(&self) -> String {
        format!("{}{}\n", self.prompt(), self.answer())
    }

    /// Characters per line: two operands, `+`, `=`, the answer and `\n`.
    pub fn line_len(digits: u32) -> usize {
        3 * digits as usize + 4
    }
}

/// All problems with `digits`-digit operands (or a seeded sample of at most `limit`), shuffled by `seed` and split
/// into (train, validation). The split is disjoint: no validation problem appears in training.
pub fn split(digits: u32, val_fraction: f64, seed: u64, limit: usize) -> (Vec<Problem>, Vec<Problem>) {
    let base = 10u64.pow(digits);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xadd1_7105);
    let mut problems: Vec<Problem> = if (base * base) as usize <= limit {
        (0..base)
            .flat_map(|a| (0..base).map(move |b| Problem { a, b, digits }))
            .collect()
    } else {
        // Too many to enumerate: sample distinct pairs.
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(limit);
        while out.len() < limit {
            let p = Problem {
                a: rand::Rng::random_range(&mut rng, 0..base),
                b: rand::Rng::random_range(&mut rng, 0..base),
                digits,
            };
            if seen.insert((p.a, p.b)) {
                out.push(p);
            }
        }
        out
    };
    problems.shuffle(&mut rng);
    let n_val = ((problems.len() as f64 * val_fraction).round() as usize).clamp(1, problems.len() - 1);
    let train = problems.split_off(n_val);
    (train, problems)
}

/// Every character the task uses, so the char vocabulary does not depend on which problems were sampled.
pub const ALPHABET: &str = "0123456789+=\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format() {
        let p = Problem { a: 7, b: 45, digits: 2 };
        assert_eq!(p.line(), "07+45=250\n");
        assert_eq!(p.line().len(), Problem::line_len(2));
        let p = Problem {
            a: 99,
            b: 99,
            digits: 2,
        };
        assert_eq!(p.answer(), "891");
    }

    #[test]
    fn split_is_disjoint_complete_and_seeded() {
        let (train, val) = split(2, 0.1, 1, 1 << 20);
        assert_eq!(train.len() + val.len(), 10_000);
        assert_eq!(val.len(), 1000);
        let t: std::collections::HashSet<_> = train.iter().map(|p| (p.a, p.b)).collect();
        assert!(val.iter().all(|p| !t.contains(&(p.a, p.b))));
        assert_eq!(split(2, 0.1, 1, 1 << 20), (train, val));
        let (train3, val3) = split(4, 0.1, 1, 5000);
        assert_eq!(train3.len() + val3.len(), 5000);
    }
}

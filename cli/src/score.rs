//! `lockstep score`: BLEU, chrF, ROUGE and METEOR of existing outputs, one segment per line, as the sacrebleu command
//! line reads its files. Corpus figures aggregate the way each tool's users aggregate: BLEU and chrF from summed
//! statistics (sacreBLEU's corpus scores), ROUGE and METEOR as the mean of the segment scores (rouge-score and nltk
//! have no corpus score; their users average).
use std::io::Write;
use std::path::{Path, PathBuf};

use lockstep_common::metrics::bleu::{Bleu, BleuStats};
use lockstep_common::metrics::chrf::ChrfStats;
use lockstep_common::metrics::meteor::meteor_multi;
use lockstep_common::metrics::rouge::{Prf, RougeScores, rouge};
use lockstep_common::metrics::wordnet::Wordnet;
use serde::Serialize;

use crate::error::{Error, Result};

/// Where `lockstep score` looks for WordNet when neither `--wordnet` nor `LOCKSTEP_WORDNET_DIR` names one (Debian's
/// `wordnet-base`).
pub const DEFAULT_WORDNET_DIR: &str = "/usr/share/wordnet";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Bleu,
    Chrf,
    Rouge,
    Meteor,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Hypotheses (system outputs), one segment per line, UTF-8.
    #[arg(long, value_name = "FILE")]
    pub hyp: PathBuf,
    /// References, one segment per line; repeat the flag for several references per segment.
    #[arg(long = "ref", value_name = "FILE", required = true)]
    pub refs: Vec<PathBuf>,
    /// Comma-separated metrics to compute.
    #[arg(long, value_delimiter = ',', default_value = "bleu,chrf,rouge,meteor")]
    pub metrics: Vec<Metric>,
    /// Print JSON (corpus figures and one row per segment) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A WordNet 3.0 dict directory for METEOR's synonym stage [default: /usr/share/wordnet if it exists].
    #[arg(long, value_name = "DIR", env = "LOCKSTEP_WORDNET_DIR")]
    pub wordnet: Option<PathBuf>,
    /// METEOR without WordNet (exact and Porter-stem stages only), even where a database is installed or
    /// LOCKSTEP_WORDNET_DIR names one.
    #[arg(long)]
    pub no_wordnet: bool,
    /// Porter-stem ROUGE tokens (rouge-score's `use_stemmer`; off there by default too).
    #[arg(long, value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub rouge_stem: bool,
}

/// What to compute over a set of segments.
#[derive(Debug, Default)]
pub struct Options {
    pub metrics: Vec<Metric>,
    pub rouge_stem: bool,
    /// The database METEOR uses for synonyms, with the directory it came from; `None`: exact + stem only.
    pub wordnet: Option<(PathBuf, Wordnet)>,
}

/// One segment: its hypothesis and one reference per reference file.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub hyp: String,
    pub refs: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BleuFigures {
    /// 0–100, as sacreBLEU.
    pub score: f64,
    pub counts: [usize; 4],
    pub totals: [usize; 4],
    /// 0–100.
    pub precisions: [f64; 4],
    pub bp: f64,
    /// hyp_len / ref_len (0 when there is no reference token).
    pub ratio: f64,
    pub hyp_len: usize,
    pub ref_len: usize,
}

impl From<Bleu> for BleuFigures {
    fn from(b: Bleu) -> Self {
        BleuFigures {
            score: b.score,
            counts: b.counts,
            totals: b.totals,
            precisions: b.precisions,
            bp: b.bp,
            ratio: if b.ref_len == 0 {
                0.0
            } else {
                b.sys_len as f64 / b.ref_len as f64
            },
            hyp_len: b.sys_len,
            ref_len: b.ref_len,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PrfFigures {
    pub p: f64,
    pub r: f64,
    pub f: f64,
}

impl From<Prf> for PrfFigures {
    fn from(x: Prf) -> Self {
        PrfFigures { p: x.p, r: x.r, f: x.f }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RougeFigures {
    pub rouge1: PrfFigures,
    pub rouge2: PrfFigures,
    #[serde(rename = "rougeL")]
    pub rouge_l: PrfFigures,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: PrfFigures,
}

impl From<RougeScores> for RougeFigures {
    fn from(s: RougeScores) -> Self {
        RougeFigures {
            rouge1: s.rouge1.into(),
            rouge2: s.rouge2.into(),
            rouge_l: s.rouge_l.into(),
            rouge_lsum: s.rouge_lsum.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RougeCorpus {
    #[serde(flatten)]
    pub scores: RougeFigures,
    pub stemmer: bool,
    pub aggregate: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeteorCorpus {
    /// 0–1, as nltk.
    pub score: f64,
    pub aggregate: &'static str,
    /// The WordNet directory used for synonyms; null: exact and stem stages only.
    pub wordnet: Option<PathBuf>,
    pub stages: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChrfCorpus {
    /// 0–100, as sacreBLEU.
    pub score: f64,
}

/// One line's scores.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// 1-based line number in the files.
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bleu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chrf: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge: Option<RougeFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meteor: Option<f64>,
}

/// Corpus figures and per-segment rows; a metric not asked for is absent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub segments: usize,
    pub references: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bleu: Option<BleuFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chrf: Option<ChrfCorpus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge: Option<RougeCorpus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meteor: Option<MeteorCorpus>,
    pub rows: Vec<Row>,
}

const MEAN_ROUGE: &str = "mean of segment scores, as rouge-score users aggregate";
const MEAN_METEOR: &str = "mean of segment scores, as nltk users average";

/// `lockstep score`: reads the files, scores them and prints the table or JSON.
pub fn command(args: &ScoreArgs) -> Result<()> {
    let segments = read_segments(&args.hyp, &args.refs)?;
    let wordnet = if args.metrics.contains(&Metric::Meteor) && !args.no_wordnet {
        open_wordnet(args.wordnet.as_deref())?
    } else {
        None
    };
    let opts = Options {
        metrics: args.metrics.clone(),
        rouge_stem: args.rouge_stem,
        wordnet,
    };
    let report = score(&segments, &opts);
    let text = if args.json {
        let mut text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Usage(format!("cannot write JSON: {e}")))?;
        text.push('\n');
        text
    } else {
        render_table(&report)
    };
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        // A reader that stopped early (`| head`) wanted no more.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(Error::Io {
            context: "cannot write the scores to stdout".into(),
            source,
        }),
        Ok(()) => Ok(()),
    }
}

/// The WordNet database named by `dir` (the flag or `LOCKSTEP_WORDNET_DIR`), else the default directory if it
/// exists, else none. A directory that is named or present but unreadable is an error rather than a silent
/// fallback, since METEOR's figures would change without anyone asking.
pub fn open_wordnet(dir: Option<&Path>) -> Result<Option<(PathBuf, Wordnet)>> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None if Path::new(DEFAULT_WORDNET_DIR).is_dir() => PathBuf::from(DEFAULT_WORDNET_DIR),
        None => return Ok(None),
    };
    let wordnet = Wordnet::open(&dir)?;
    Ok(Some((dir, wordnet)))
}

/// Reads `hyp` and every reference file into segments: one per line, with only the line terminator (`\n` or
/// `\r\n`) removed. Every reference file must have as many lines as `hyp`.
pub fn read_segments(hyp: &Path, refs: &[PathBuf]) -> Result<Vec<Segment>> {
    let hyps = read_lines(hyp, "hypothesis")?;
    if hyps.is_empty() {
        return Err(Error::Usage(format!(
            "hypothesis file {} is empty: nothing to score",
            hyp.display()
        )));
    }
    let mut segments: Vec<Segment> = hyps
        .into_iter()
        .map(|h| Segment {
            hyp: h,
            refs: Vec::with_capacity(refs.len()),
        })
        .collect();
    for path in refs {
        let lines = read_lines(path, "reference")?;
        if lines.len() != segments.len() {
            return Err(Error::LineCount {
                hyp: hyp.to_path_buf(),
                hyp_lines: segments.len(),
                reference: path.clone(),
                ref_lines: lines.len(),
            });
        }
        for (segment, line) in segments.iter_mut().zip(lines) {
            segment.refs.push(line);
        }
    }
    Ok(segments)
}

fn read_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        context: format!("cannot read {what} file {}", path.display()),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        Error::Usage(format!(
            "{what} file {} is not UTF-8 (line {line}); convert it to UTF-8",
            path.display()
        ))
    })?;
    // `str::lines` splits at `\n` and `\r\n` only and drops one final terminator, as a line reader does.
    Ok(text.lines().map(str::to_owned).collect())
}

/// Scores `segments` with the metrics in `opts`.
pub fn score(segments: &[Segment], opts: &Options) -> Report {
    let want = |m| opts.metrics.contains(&m);
    let mut rows: Vec<Row> = (1..=segments.len())
        .map(|line| Row {
            line,
            bleu: None,
            chrf: None,
            rouge: None,
            meteor: None,
        })
        .collect();
    let mut report = Report {
        segments: segments.len(),
        references: segments.first().map_or(0, |s| s.refs.len()),
        bleu: None,
        chrf: None,
        rouge: None,
        meteor: None,
        rows: Vec::new(),
    };

    if want(Metric::Bleu) {
        let mut total = BleuStats::default();
        for (segment, row) in segments.iter().zip(&mut rows) {
            let stats = BleuStats::segment(&segment.hyp, &ref_strs(segment));
            row.bleu = Some(stats.score(true).score);
            total += stats;
        }
        report.bleu = Some(total.score(false).into());
    }
    if want(Metric::Chrf) {
        let mut total = ChrfStats::default();
        for (segment, row) in segments.iter().zip(&mut rows) {
            let stats = ChrfStats::segment(&segment.hyp, &ref_strs(segment));
            row.chrf = Some(stats.score());
            total += stats;
        }
        report.chrf = Some(ChrfCorpus { score: total.score() });
    }
    if want(Metric::Rouge) {
        let mut sum = [[0.0_f64; 3]; 4];
        for (segment, row) in segments.iter().zip(&mut rows) {
            let scores = best_rouge(&segment.hyp, &segment.refs, opts.rouge_stem);
            for (acc, prf) in sum.iter_mut().zip(variants(&scores)) {
                acc[0] += prf.p;
                acc[1] += prf.r;
                acc[2] += prf.f;
            }
            row.rouge = Some(scores.into());
        }
        let n = segments.len().max(1) as f64;
        let mean = |acc: [f64; 3]| PrfFigures {
            p: acc[0] / n,
            r: acc[1] / n,
            f: acc[2] / n,
        };
        report.rouge = Some(RougeCorpus {
            scores: RougeFigures {
                rouge1: mean(sum[0]),
                rouge2: mean(sum[1]),
                rouge_l: mean(sum[2]),
                rouge_lsum: mean(sum[3]),
            },
            stemmer: opts.rouge_stem,
            aggregate: MEAN_ROUGE,
        });
    }
    if want(Metric::Meteor) {
        let wordnet = opts.wordnet.as_ref().map(|(_, w)| w);
        let mut sum = 0.0;
        for (segment, row) in segments.iter().zip(&mut rows) {
            let m = meteor_multi(&segment.hyp, &segment.refs, wordnet);
            row.meteor = Some(m);
            sum += m;
        }
        report.meteor = Some(MeteorCorpus {
            score: sum / segments.len().max(1) as f64,
            aggregate: MEAN_METEOR,
            wordnet: opts.wordnet.as_ref().map(|(dir, _)| dir.clone()),
            stages: if wordnet.is_some() {
                "exact, stem, synonym"
            } else {
                "exact, stem (no WordNet: synonym stage skipped)"
            },
        });
    }
    report.rows = rows;
    report
}

fn ref_strs(segment: &Segment) -> Vec<&str> {
    segment.refs.iter().map(String::as_str).collect()
}

fn variants(s: &RougeScores) -> [Prf; 4] {
    [s.rouge1, s.rouge2, s.rouge_l, s.rouge_lsum]
}

/// rouge-score's `score_multi`: per variant, the reference with the highest F (the first on a tie).
fn best_rouge(hyp: &str, refs: &[String], stem: bool) -> RougeScores {
    let mut best: Option<RougeScores> = None;
    for reference in refs {
        let s = rouge(hyp, reference, stem);
        best = Some(match best {
            None => s,
            Some(b) => {
                let pick = |old: Prf, new: Prf| if new.f > old.f { new } else { old };
                RougeScores {
                    rouge1: pick(b.rouge1, s.rouge1),
                    rouge2: pick(b.rouge2, s.rouge2),
                    rouge_l: pick(b.rouge_l, s.rouge_l),
                    rouge_lsum: pick(b.rouge_lsum, s.rouge_lsum),
                }
            }
        });
    }
    best.unwrap_or_default()
}

/// The human table: corpus figures, each with how it was aggregated.
pub fn render_table(r: &Report) -> String {
    let mut out = format!(
        "{} segments, {} reference{} each\n",
        r.segments,
        r.references,
        if r.references == 1 { "" } else { "s" }
    );
    if let Some(b) = &r.bleu {
        let join = |xs: &[usize; 4]| xs.map(|x| x.to_string()).join("/");
        let precisions = b.precisions.map(|p| format!("{p:.1}")).join("/");
        out += &format!(
            "BLEU        {:>7.2}  {precisions} (BP = {:.3}, ratio = {:.3}, hyp_len = {}, ref_len = {}); n-gram counts {} \
             of totals {}; sacreBLEU 13a, corpus statistics\n",
            b.score,
            b.bp,
            b.ratio,
            b.hyp_len,
            b.ref_len,
            join(&b.counts),
            join(&b.totals)
        );
    }
    if let Some(c) = &r.chrf {
        out += &format!(
            "chrF        {:>7.2}  character 6-grams, β = 2, corpus statistics\n",
            c.score
        );
    }
    if let Some(g) = &r.rouge {
        let rows = [
            ("ROUGE-1", g.scores.rouge1),
            ("ROUGE-2", g.scores.rouge2),
            ("ROUGE-L", g.scores.rouge_l),
            ("ROUGE-Lsum", g.scores.rouge_lsum),
        ];
        for (name, prf) in rows {
            out += &format!("{name:<11} {:>7.4}  F (P {:.4}, R {:.4})\n", prf.f, prf.p, prf.r);
        }
        out += &format!(
            "            ROUGE: {}; stemmer {}\n",
            g.aggregate,
            if g.stemmer { "on" } else { "off" }
        );
    }
    if let Some(m) = &r.meteor {
        let wordnet = match &m.wordnet {
            Some(dir) => format!("WordNet {}", dir.display()),
            None => "no WordNet: exact + stem stages only, synonyms not matched (give --wordnet DIR)".to_string(),
        };
        out += &format!("METEOR      {:>7.4}  {}; {wordnet}\n", m.score, m.aggregate);
    }
    out
}

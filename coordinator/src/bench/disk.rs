//! `treaty bench --disk-sample-s`: the size on disk of the coordinator's and each
//! participant's data directory, sampled while the bench runs, and the figures that say
//! whether it stays flat (docs/limits.md, "Disk").
//!
//! A sample walks each directory (at most `MAX_FILES_WALKED` entries) and adds up the
//! blocks its files occupy (`st_blocks`, what `du` counts) and their lengths. The
//! summary compares the second quarter of the run with the last: a directory that keeps
//! growing shows a ratio well above 1.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most directory entries one sample walks per directory.
const MAX_FILES_WALKED: usize = 100_000;
/// Most samples kept (a sample a second for more than a day).
pub const MAX_SAMPLES: usize = 100_000;

/// The size of one directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirSize {
    /// Bytes of the blocks its files occupy.
    pub allocated_bytes: u64,
    /// Their lengths added up.
    pub apparent_bytes: u64,
}

/// Every directory's size at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub elapsed: Duration,
    /// Transactions finished so far.
    pub transactions: u64,
    pub sizes: Vec<DirSize>,
}

/// Adds up the files under `dir` (missing files and directories count as empty: sled
/// removes old blobs and snapshots while we walk).
pub fn dir_size(dir: &Path) -> DirSize {
    use std::os::unix::fs::MetadataExt;
    let mut size = DirSize::default();
    let mut pending = vec![dir.to_path_buf()];
    let mut walked = 0;
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            walked += 1;
            if walked > MAX_FILES_WALKED {
                return size;
            }
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                size.allocated_bytes += metadata.blocks() * 512;
                size.apparent_bytes += metadata.len();
            }
        }
    }
    size
}

/// The directories sampled, with their names.
#[derive(Debug, Clone)]
pub struct Watched {
    pub names: Vec<String>,
    pub dirs: Vec<PathBuf>,
}

impl Watched {
    pub fn sample(&self, elapsed: Duration, transactions: u64) -> Sample {
        Sample {
            elapsed,
            transactions,
            sizes: self.dirs.iter().map(|dir| dir_size(dir)).collect(),
        }
    }

    /// One line of a sample, for people.
    pub fn line(&self, sample: &Sample) -> String {
        let sizes: Vec<String> = self
            .names
            .iter()
            .zip(&sample.sizes)
            .map(|(name, size)| format!("{name} {}", mib(size.allocated_bytes)))
            .collect();
        format!(
            "disk at {:>6.0} s, {:>9} transactions: {}",
            sample.elapsed.as_secs_f64(),
            sample.transactions,
            sizes.join(", ")
        )
    }

    /// The CSV header and one row per sample (allocated and apparent bytes).
    pub fn csv(&self, samples: &[Sample]) -> String {
        let mut out = String::from("elapsed_s,transactions");
        for name in &self.names {
            out.push_str(&format!(",{name}_allocated_bytes,{name}_apparent_bytes"));
        }
        out.push('\n');
        for sample in samples {
            out.push_str(&format!(
                "{:.1},{}",
                sample.elapsed.as_secs_f64(),
                sample.transactions
            ));
            for size in &sample.sizes {
                out.push_str(&format!(
                    ",{},{}",
                    size.allocated_bytes, size.apparent_bytes
                ));
            }
            out.push('\n');
        }
        out
    }

    /// Whether each directory stayed flat: over the second half, its least and largest
    /// size, and the mean of the last quarter over the mean of the second; `None` with
    /// fewer than 4 samples.
    pub fn summarize(&self, samples: &[Sample]) -> Option<Vec<DirSummary>> {
        let quarter = samples.len() / 4;
        if quarter == 0 {
            return None;
        }
        let mut directories = Vec::new();
        for (index, name) in self.names.iter().enumerate() {
            let sizes: Vec<u64> = samples
                .iter()
                .map(|s| s.sizes[index].allocated_bytes)
                .collect();
            let mean = |part: &[u64]| part.iter().sum::<u64>() as f64 / part.len().max(1) as f64;
            let second_quarter = mean(&sizes[quarter..2 * quarter]);
            let last_quarter = mean(&sizes[sizes.len() - quarter..]);
            let second_half = &sizes[sizes.len() / 2..];
            directories.push(DirSummary {
                name: name.clone(),
                second_half_min_bytes: second_half.iter().min().copied().unwrap_or(0),
                second_half_max_bytes: second_half.iter().max().copied().unwrap_or(0),
                last_quarter_mean_bytes: last_quarter as u64,
                second_quarter_mean_bytes: second_quarter as u64,
                last_over_second_quarter: (second_quarter > 0.0)
                    .then(|| last_quarter / second_quarter),
            });
        }
        Some(directories)
    }

    /// [`summarize`](Self::summarize) as lines to print.
    pub fn summary(&self, samples: &[Sample]) -> Vec<String> {
        let Some(directories) = self.summarize(samples) else {
            return vec!["too few disk samples for a summary (fewer than 4)".into()];
        };
        directories
            .iter()
            .map(|d| {
                format!(
                    "{}: second half between {} and {}; mean of the last quarter {} / of the \
                     second quarter {} = {}",
                    d.name,
                    mib(d.second_half_min_bytes),
                    mib(d.second_half_max_bytes),
                    mib(d.last_quarter_mean_bytes),
                    mib(d.second_quarter_mean_bytes),
                    d.last_over_second_quarter
                        .map_or_else(|| "n/a".to_string(), |r| format!("{r:.3}")),
                )
            })
            .collect()
    }
}

/// How one data directory's size went over a run (`--disk-sample-s`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirSummary {
    pub name: String,
    pub second_half_min_bytes: u64,
    pub second_half_max_bytes: u64,
    pub last_quarter_mean_bytes: u64,
    pub second_quarter_mean_bytes: u64,
    /// `None` when the second quarter's mean is 0.
    pub last_over_second_quarter: Option<f64>,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up_files_in_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("db"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("blobs").join("1"), vec![1u8; 5_000]).unwrap();
        let size = dir_size(dir.path());
        assert_eq!(size.apparent_bytes, 15_000);
        assert!(size.allocated_bytes >= 12_288, "{size:?}");
        assert_eq!(dir_size(&dir.path().join("missing")), DirSize::default());
    }

    #[test]
    fn the_summary_compares_the_last_quarter_with_the_second() {
        let watched = Watched {
            names: vec!["flat".into(), "growing".into()],
            dirs: Vec::new(),
        };
        let samples: Vec<Sample> = (0..8u64)
            .map(|i| Sample {
                elapsed: Duration::from_secs(i),
                transactions: i * 100,
                sizes: vec![
                    DirSize {
                        allocated_bytes: 1 << 20,
                        apparent_bytes: 0,
                    },
                    DirSize {
                        allocated_bytes: (i + 1) << 20,
                        apparent_bytes: 0,
                    },
                ],
            })
            .collect();
        let summary = watched.summary(&samples);
        assert!(summary[0].ends_with("= 1.000"), "{}", summary[0]);
        // Quarters of two: (7 + 8) / (3 + 4).
        assert!(summary[1].ends_with("= 2.143"), "{}", summary[1]);
        assert!(
            watched
                .csv(&samples)
                .starts_with("elapsed_s,transactions,flat_allocated")
        );
    }
}

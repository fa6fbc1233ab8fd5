//! `treaty serve --config FILE`: the daemon's settings from a TOML file; and
//! `--print-config`: the effective settings, as TOML.
//!
//! The keys are the fields of [`ServeConfig`], which are the names of `treaty serve`'s
//! flags with `_` for `-`, all at the top level (`retry_backoff_max_ms = 10000`,
//! `allow_endpoint = ["10.0.0.0/8:*"]`). Each setting comes from the first source that
//! has it: a flag, then its `TREATY_*` environment variable, then the file, then the
//! built-in default. Relative paths are relative to the working directory, as for flags.
//!
//! Invariants: the file is read once, at start (SIGHUP reloads certificates and tokens,
//! not this file). A key that is no setting is an error naming it, and so is a value of
//! the wrong type; ranges and consistency are then checked by [`ServeConfig::validate`],
//! which names the field whatever its source. Secrets ([`SECRET_KEYS`]) are never read
//! from a file, and never printed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::config::ServeConfig;
use crate::security::SECRET_KEYS;

/// A config file that cannot be used; the daemon does not start.
#[derive(Debug, thiserror::Error)]
#[error("config file {}: {problem}", .path.display())]
pub struct ConfigFileError {
    pub path: PathBuf,
    pub problem: FileProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("{0}")]
    Syntax(String),
    #[error(
        "unknown key {0:?} (the keys are the names of `treaty serve`'s flags with `_` for \
         `-`, such as retry_backoff_max_ms)"
    )]
    UnknownKey(String),
    #[error(
        "{0}: secrets are not read from a config file (others may read it); use the \
         TREATY_{upper} environment variable", upper = .0.to_uppercase()
    )]
    Secret(String),
    #[error("{key}: {message}")]
    BadValue { key: String, message: String },
    #[error("the merged settings cannot be written as TOML: {0}")]
    Unrepresentable(String),
}

/// The largest config file read: far more than every setting takes.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// The settings a config file may hold: every argument of [`ServeConfig`], so a flag and
/// its key cannot drift apart.
pub fn setting_keys() -> BTreeSet<String> {
    let command = <ServeConfig as clap::Args>::augment_args(clap::Command::new("serve"));
    command
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect()
}

/// Reads `path` (once) and merges it into `given`, the settings parsed from flags,
/// environment and defaults; `from_args(key)` says whether a flag or an environment
/// variable gave that setting, which then wins over the file.
pub fn read_and_merge(
    path: &Path,
    given: ServeConfig,
    from_args: impl Fn(&str) -> bool,
) -> Result<ServeConfig, ConfigFileError> {
    let error = |problem| ConfigFileError {
        path: path.to_path_buf(),
        problem,
    };
    let text = treaty_sdk::limits::read_text_file(path, MAX_CONFIG_FILE_BYTES)
        .map_err(|e| error(FileProblem::Read(e.to_string())))?;
    merge(given, &text, from_args).map_err(error)
}

/// [`read_and_merge`] on the file's text.
pub fn merge(
    given: ServeConfig,
    text: &str,
    from_args: impl Fn(&str) -> bool,
) -> Result<ServeConfig, FileProblem> {
    let file: toml::Table = toml::from_str(text).map_err(|e| FileProblem::Syntax(e.to_string()))?;
    let known = setting_keys();
    let base = toml::Table::try_from(&given).map_err(|e| unrepresentable(&given, e))?;
    let mut merged = base.clone();
    for (key, value) in file {
        if SECRET_KEYS.contains(&key.as_str()) {
            return Err(FileProblem::Secret(key));
        }
        if !known.contains(&key) {
            return Err(FileProblem::UnknownKey(key));
        }
        // Each value is checked on its own, so that the error names its key: serde's
        // errors inside the flattened security settings do not.
        let mut probe = base.clone();
        probe.insert(key.clone(), value.clone());
        if let Err(e) = probe.try_into::<ServeConfig>() {
            return Err(FileProblem::BadValue {
                key,
                message: e.message().to_string(),
            });
        }
        if !from_args(&key) {
            merged.insert(key, value);
        }
    }
    // Every value was checked above; settings are independent of one another here.
    let mut config: ServeConfig = merged
        .try_into()
        .map_err(|e: toml::de::Error| FileProblem::Syntax(e.to_string()))?;
    // Skipped by serde: only ever from a flag or the environment.
    config.security.participant_token = given.security.participant_token;
    Ok(config)
}

/// The effective settings as TOML that `--config` reads back: every setting with a value,
/// then a comment naming those without one. Secrets are left out.
pub fn to_toml(config: &ServeConfig) -> Result<String, FileProblem> {
    let body = toml::to_string(config).map_err(|e| unrepresentable(config, e))?;
    let printed = toml::Table::try_from(config).map_err(|e| unrepresentable(config, e))?;
    let unset: Vec<String> = setting_keys()
        .into_iter()
        .filter(|key| !printed.contains_key(key) && !SECRET_KEYS.contains(&key.as_str()))
        .collect();
    let mut text = String::from(
        "# The effective configuration of `treaty serve`: each setting from its flag, else\n\
         # its TREATY_* environment variable, else the --config file, else the default.\n",
    );
    text.push_str(&body);
    if !unset.is_empty() {
        text.push_str(&format!("# Not set: {}.\n", unset.join(", ")));
    }
    if config.security.participant_token.is_some() {
        text.push_str("# participant_token is set (never printed).\n");
    }
    Ok(text)
}

/// Why `config` cannot be written as TOML, naming the settings at fault where it can:
/// TOML's integers end at 2^63 - 1, below a `u64` flag's largest value.
fn unrepresentable(config: &ServeConfig, error: toml::ser::Error) -> FileProblem {
    let at_fault: Vec<String> = match serde_json::to_value(config) {
        Ok(serde_json::Value::Object(settings)) => settings
            .into_iter()
            .filter(|(_, value)| toml::Value::try_from(value).is_err())
            .map(|(key, value)| format!("{key} = {value}"))
            .collect(),
        _ => Vec::new(),
    };
    if at_fault.is_empty() {
        return FileProblem::Unrepresentable(error.to_string());
    }
    FileProblem::Unrepresentable(format!(
        "{} ({error}: a TOML integer is at most {})",
        at_fault.join(", "),
        i64::MAX
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, ServeArgs};
    use clap::{CommandFactory, FromArgMatches};

    /// `treaty serve ARGS` parsed as the binary does, with the file's text merged in.
    fn serve(args: &[&str], file: &str) -> Result<ServeConfig, FileProblem> {
        let (args, matches) = parse(args);
        merge(args.settings, file, |key| {
            crate::cli::from_args(&matches, key)
        })
    }

    fn parse(args: &[&str]) -> (ServeArgs, clap::ArgMatches) {
        let argv = ["treaty", "serve"].iter().chain(args);
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        let Command::Serve(serve) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("parsed as serve");
        };
        let serve_matches = matches.subcommand_matches("serve").unwrap().clone();
        (*serve, serve_matches)
    }

    const FILE: &str = r#"
listen = "127.0.0.1:7500"
data_dir = "/var/lib/treaty"
retry_backoff_initial_ms = 50
retry_backoff_max_ms = 5000
max_connections = 64
allow_endpoint = ["10.0.0.0/8:*"]
history_records = false
participant_call_streams = false
"#;

    #[test]
    fn the_file_sets_what_no_flag_sets() {
        let config = serve(&["--retry-backoff-max-ms", "800"], FILE).unwrap();
        assert_eq!(config.listen, "127.0.0.1:7500".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/treaty"));
        assert_eq!(config.retry_backoff_initial_ms, 50);
        assert_eq!(config.retry_backoff_max_ms, 800, "the flag wins");
        assert_eq!(config.security.max_connections, 64);
        assert_eq!(config.allow_endpoint, ["10.0.0.0/8:*"]);
        assert!(!config.history_records);
        assert!(!config.participant_call_streams);
        assert!(
            !config
                .runtime("127.0.0.1:7500".parse().unwrap())
                .participant_call_streams
        );
        assert_eq!(config.shutdown_grace_ms, crate::defaults::SHUTDOWN_GRACE_MS);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn flags_that_repeat_or_come_in_pairs_mix_with_the_file() {
        let config = serve(
            &["--allow-endpoint", "a.internal:1", "--tls-key", "k.pem"],
            "allow_endpoint = [\"b.internal:2\"]\ntls_cert = \"c.pem\"\n",
        )
        .unwrap();
        assert_eq!(config.allow_endpoint, ["a.internal:1"]);
        assert_eq!(config.security.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(config.security.tls_key, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn unknown_keys_secrets_and_bad_values_are_named() {
        assert_eq!(
            serve(&[], "retry_backof_max_ms = 5\n").unwrap_err(),
            FileProblem::UnknownKey("retry_backof_max_ms".into())
        );
        assert_eq!(
            serve(&[], "print_config = true\n").unwrap_err(),
            FileProblem::UnknownKey("print_config".into())
        );
        assert_eq!(
            serve(&[], "participant_token = \"s3cret\"\n").unwrap_err(),
            FileProblem::Secret("participant_token".into())
        );
        for (text, key) in [
            ("retry_backoff_max_ms = \"soon\"\n", "retry_backoff_max_ms"),
            ("listen = \"nowhere\"\n", "listen"),
            // Inside the flattened security settings too.
            ("max_connections = -1\n", "max_connections"),
            ("allow_unauthenticated = \"yes\"\n", "allow_unauthenticated"),
        ] {
            let error = serve(&[], text).unwrap_err();
            assert!(
                matches!(&error, FileProblem::BadValue { key: k, .. } if k == key),
                "{text}: {error}"
            );
            assert!(
                error.to_string().starts_with(&format!("{key}: ")),
                "{error}"
            );
        }
        // Even when a flag overrides it: the file is wrong all the same.
        let error = serve(&["--shards", "2"], "shards = \"two\"\n").unwrap_err();
        assert!(matches!(error, FileProblem::BadValue { .. }), "{error}");
        assert!(matches!(
            serve(&[], "listen = ").unwrap_err(),
            FileProblem::Syntax(_)
        ));
    }

    #[test]
    fn printed_settings_read_back_the_same_and_hold_no_secret() {
        let config = serve(&["--participant-token", "s3cret-token"], FILE).unwrap();
        let printed = to_toml(&config).unwrap();
        assert!(!printed.contains("s3cret-token"), "{printed}");
        assert!(printed.contains("# participant_token is set"), "{printed}");
        assert!(
            printed.contains("# Not set: advertise_endpoint,"),
            "{printed}"
        );
        let again = serve(&[], &printed).unwrap();
        assert_eq!(
            to_toml(&again)
                .unwrap()
                .replace("# participant_token is set (never printed).\n", ""),
            printed.replace("# participant_token is set (never printed).\n", "")
        );
        assert_eq!(again.security.participant_token, None);
    }

    #[test]
    fn every_setting_can_be_printed_and_read_back() {
        let (args, _) = parse(&[]);
        let printed = to_toml(&args.settings).unwrap();
        let table: toml::Table = toml::from_str(&printed).unwrap();
        let keys: BTreeSet<String> = table.keys().cloned().collect();
        let known = setting_keys();
        assert!(keys.is_subset(&known), "{keys:?} vs {known:?}");
        assert_eq!(
            serve(&[], &printed).map(|c| to_toml(&c).unwrap()),
            Ok(printed)
        );
    }
}

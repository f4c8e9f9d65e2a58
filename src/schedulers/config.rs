//! `scheduler_config.json`, and which scheduler class to build from it.
//!
//! diffusers' rule, which this mirrors: a scheduler class takes from the JSON every key it has an `__init__`
//! argument for, and uses its OWN default for every argument the JSON does not set. That holds when the JSON
//! is loaded into its own `_class_name` class and when that config is passed on with
//! `Other.from_config(pipe.scheduler.config)`: diffusers records the keys the file lacked
//! (`_use_default_values`) and drops them again before building the other class, so the source class's
//! defaults never leak into the target. Example: SD1.5's original file has no `timestep_spacing`; PNDM
//! defaults it to "leading", but Euler built from that config uses Euler's own default, "linspace".
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The file name of a scheduler config inside a model's `scheduler/` folder.
pub const SCHEDULER_CONFIG_FILE: &str = "scheduler_config.json";

/// `algorithm_type` of DPMSolverMultistepScheduler for the stochastic DPM-Solver++ (A1111's "DPM++ 2M SDE").
pub const SDE_DPMSOLVER_PP: &str = "sde-dpmsolver++";

/// The schedulers this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    UniPc,
    Heun,
    Lms,
    KDpm2,
    KDpm2Ancestral,
    /// DPMSolverMultistepScheduler with `algorithm_type = "sde-dpmsolver++"` (A1111's "DPM++ 2M SDE").
    DpmSolverMultistepSde,
    /// DPMSolverSDEScheduler, Brownian-tree noise (A1111's "DPM++ SDE").
    DpmSolverSde,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 12] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::UniPc,
        SchedulerKind::Heun,
        SchedulerKind::Lms,
        SchedulerKind::KDpm2,
        SchedulerKind::KDpm2Ancestral,
        SchedulerKind::DpmSolverMultistepSde,
        SchedulerKind::DpmSolverSde,
    ];

    /// The name used on the command line.
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Lms => "lms",
            SchedulerKind::KDpm2 => "dpm2",
            SchedulerKind::KDpm2Ancestral => "dpm2-a",
            SchedulerKind::DpmSolverMultistepSde => "dpm++2m-sde",
            SchedulerKind::DpmSolverSde => "dpm++sde",
        }
    }

    /// The diffusers class (`_class_name` in `scheduler_config.json`).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::KDpm2 => "KDPM2DiscreteScheduler",
            SchedulerKind::KDpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistepSde => "DPMSolverMultistepScheduler",
            SchedulerKind::DpmSolverSde => "DPMSolverSDEScheduler",
        }
    }

    /// How many model evaluations one of the requested steps takes, as diffusers' `scheduler.order`: img2img
    /// skips `order` timesteps per skipped step (Heun and DPM2 list every timestep but the first twice).
    pub fn order(self) -> usize {
        match self {
            SchedulerKind::Heun
            | SchedulerKind::KDpm2
            | SchedulerKind::KDpm2Ancestral
            | SchedulerKind::DpmSolverSde => 2,
            _ => 1,
        }
    }

    /// The scheduler for a diffusers class name (`_class_name`); an error lists the implemented classes.
    pub fn from_class_name(name: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name).ok_or_else(|| {
            let classes = Self::ALL.map(|k| k.class_name()).join(", ");
            Error::Invalid(format!("scheduler class {name:?} is not implemented; implemented: {classes}"))
        })
    }

    fn valid_names() -> String {
        Self::ALL.map(|k| k.cli_name()).join(", ")
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|k| k.cli_name() == wanted).ok_or_else(|| {
            Error::Invalid(format!("unknown scheduler {s:?}; valid schedulers: {}", Self::valid_names()))
        })
    }
}

/// A parsed `scheduler_config.json`: the keys as the file wrote them, plus any overrides.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The file it came from, named in every error about it.
    pub path: PathBuf,
    /// `_class_name`: the scheduler class the model ships with.
    class_name: Option<String>,
    /// Public keys only (diffusers drops `_`-prefixed ones before building a class).
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json` (or the one inside a `scheduler/` folder); errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let path = if path.is_dir() { path.join(SCHEDULER_CONFIG_FILE) } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses JSON text; `origin` is the path to name in errors. Python's non-standard `-Infinity`,
    /// `Infinity` and `NaN` (which diffusers writes, e.g. for `lambda_min_clipped`) become strings.
    pub fn from_json_str(text: &str, origin: impl Into<PathBuf>) -> Result<Self> {
        let path = origin.into();
        let value: Value = serde_json::from_str(&quote_non_finite(text)).map_err(|e| Error::config(&path, e))?;
        let Value::Object(mut values) = value else {
            return Err(Error::config(&path, "expected a JSON object"));
        };
        let class_name = match values.remove("_class_name") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(name),
            Some(other) => return Err(Error::config(&path, format!("_class_name must be a string, found {other}"))),
        };
        values.retain(|key, _| !key.starts_with('_'));
        Ok(Self { path, class_name, values })
    }

    /// Sets one key, like a keyword argument to diffusers' `from_config` (e.g. `use_karras_sigmas`, `true`).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.values.insert(key.to_string(), value.into());
        self
    }

    /// `_class_name` (the scheduler class the model ships with), or "" when the file has none.
    pub fn class_name(&self) -> String {
        self.class_name.clone().unwrap_or_default()
    }

    /// The raw value of a key as the file (or an override) set it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The scheduler named by `_class_name`.
    pub fn own_kind(&self) -> Result<SchedulerKind> {
        let name = self
            .class_name
            .as_deref()
            .ok_or_else(|| Error::config(&self.path, "has no _class_name; choose a scheduler explicitly"))?;
        let kind = SchedulerKind::from_class_name(name).map_err(|_| {
            Error::config(
                &self.path,
                format!(
                    "scheduler class {name} is not implemented; choose one of {} explicitly",
                    SchedulerKind::valid_names()
                ),
            )
        })?;
        // One diffusers class, two samplers: the SDE variant is chosen by `algorithm_type`.
        let sde = self.get("algorithm_type") == Some(&Value::from(SDE_DPMSOLVER_PP));
        Ok(if kind == SchedulerKind::DpmSolverMultistep && sde { SchedulerKind::DpmSolverMultistepSde } else { kind })
    }

    /// Sets `key` only where the file does not: a class default that differs from the one [`BetaConfig`]
    /// (`schedule.rs`) assumes for every class.
    pub(crate) fn with_default(self, key: &str, value: impl Into<Value>) -> Self {
        if self.values.contains_key(key) {
            self
        } else {
            self.with(key, value)
        }
    }

    /// The typed config of one scheduler class: keys it knows from the file, its own defaults for the rest.
    pub(crate) fn parse<T: DeserializeOwned>(&self, kind: SchedulerKind) -> Result<T> {
        serde_json::from_value(Value::Object(self.values.clone()))
            .map_err(|e| Error::config(&self.path, format!("as {}: {e}", kind.class_name())))
    }

    /// An error about this config for a setting the scheduler does not implement.
    pub(crate) fn unsupported(&self, kind: SchedulerKind, what: impl std::fmt::Display) -> Error {
        Error::config(&self.path, format!("{}: {what} is not supported", kind.class_name()))
    }
}

/// Wraps the bare tokens `-Infinity`, `Infinity` and `NaN` outside JSON strings in quotes.
fn quote_non_finite(text: &str) -> String {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string {
            if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(*t)) {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
            in_string = c == '"';
        } else if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            in_string = false;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.cli_name().parse::<SchedulerKind>().unwrap(), kind);
            // DPM++ 2M SDE shares DPM++ 2M's class; the config's algorithm_type tells them apart (`own_kind`).
            if kind != SchedulerKind::DpmSolverMultistepSde {
                assert_eq!(SchedulerKind::from_class_name(kind.class_name()).unwrap(), kind);
            }
            assert_eq!(kind.to_string(), kind.cli_name());
        }
        assert_eq!("Euler-A".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        let err = SchedulerKind::from_class_name("DEISMultistepScheduler").unwrap_err().to_string();
        assert!(err.contains("DEISMultistepScheduler") && err.contains("UniPCMultistepScheduler"), "{err}");
        let sde = r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#;
        let sde = SchedulerConfig::from_json_str(sde, "s.json").unwrap();
        assert_eq!(sde.own_kind().unwrap(), SchedulerKind::DpmSolverMultistepSde);
    }

    #[test]
    fn unknown_name_lists_the_valid_ones() {
        let err = "dpm fast".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("\"dpm fast\""), "{err}");
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.cli_name()), "{err}");
        }
    }

    #[test]
    fn private_keys_are_dropped_and_class_kept() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "steps_offset": 1}"#,
            "mem.json",
        )
        .unwrap();
        assert_eq!(cfg.class_name(), "PNDMScheduler");
        assert_eq!(cfg.own_kind().unwrap(), SchedulerKind::Pndm);
        assert!(cfg.get("_diffusers_version").is_none());
        assert_eq!(cfg.get("steps_offset"), Some(&Value::from(1)));
        let cfg = cfg.with("steps_offset", 0);
        assert_eq!(cfg.get("steps_offset"), Some(&Value::from(0)));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let err = SchedulerConfig::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.json"), "{err}");

        let bad = dir.path().join("bad_scheduler.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let err = SchedulerConfig::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad_scheduler.json"), "{err}");

        let array = dir.path().join("array.json");
        std::fs::write(&array, "[1, 2]").unwrap();
        let err = SchedulerConfig::from_file(&array).unwrap_err().to_string();
        assert!(err.contains("array.json") && err.contains("object"), "{err}");

        let no_class = SchedulerConfig::from_json_str("{}", "anon.json").unwrap();
        let err = no_class.own_kind().unwrap_err().to_string();
        assert!(err.contains("anon.json") && err.contains("_class_name"), "{err}");

        let deis = SchedulerConfig::from_json_str(r#"{"_class_name": "DEISMultistepScheduler"}"#, "deis.json").unwrap();
        let err = deis.own_kind().unwrap_err().to_string();
        assert!(err.contains("DEISMultistepScheduler") && err.contains("euler-a"), "{err}");
    }

    #[test]
    fn python_non_finite_numbers_become_strings() {
        let text = r#"{"a": "say \"NaN\" -Infinity", "b": NaN, "c": [Infinity, -Infinity]}"#;
        assert_eq!(
            quote_non_finite(text),
            r#"{"a": "say \"NaN\" -Infinity", "b": "NaN", "c": ["Infinity", "-Infinity"]}"#
        );
    }

    #[test]
    fn a_folder_means_its_scheduler_config() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-sd15/scheduler");
        let cfg = SchedulerConfig::from_file(dir).unwrap();
        assert!(cfg.path.ends_with(SCHEDULER_CONFIG_FILE));
        assert_eq!(cfg.own_kind().unwrap(), SchedulerKind::Pndm);
    }
}

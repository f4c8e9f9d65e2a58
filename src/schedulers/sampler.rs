//! What A1111 calls a sampler: a scheduler plus how its sigmas are spaced ("DPM++ 2M Karras" is
//! DPM-Solver++ 2M with Karras sigmas), and the names `--scheduler` accepts for one.
//!
//! The A1111 names map to diffusers classes as diffusers' scheduler overview documents them
//! ("DPM++ 2M" → `DPMSolverMultistepScheduler`, "… Karras" → `use_karras_sigmas=True`, "PLMS" → `PNDMScheduler`).
use std::str::FromStr;

use super::{SchedulerConfig, SchedulerKind};
use crate::{Error, Result};

/// How a sampler's inference sigmas are respaced (diffusers' `use_karras_sigmas` / `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigmaSpacing {
    /// Karras et al. (2022): even in sigma^(1/7), denser at low noise.
    Karras,
    /// Even in log-sigma.
    Exponential,
}

impl SigmaSpacing {
    pub const ALL: [SigmaSpacing; 2] = [SigmaSpacing::Karras, SigmaSpacing::Exponential];

    /// The suffix of our scheduler names (`dpm++2m-karras`).
    pub fn cli_suffix(self) -> &'static str {
        match self {
            SigmaSpacing::Karras => "karras",
            SigmaSpacing::Exponential => "exponential",
        }
    }

    /// The suffix of A1111's sampler names ("DPM++ 2M Karras").
    pub fn a1111_suffix(self) -> &'static str {
        match self {
            SigmaSpacing::Karras => "Karras",
            SigmaSpacing::Exponential => "Exponential",
        }
    }

    /// The diffusers config key that turns this spacing on.
    pub fn config_key(self) -> &'static str {
        match self {
            SigmaSpacing::Karras => "use_karras_sigmas",
            SigmaSpacing::Exponential => "use_exponential_sigmas",
        }
    }
}

/// A1111's sampler names for our schedulers, with the old `k_…` aliases: (name, scheduler, aliases).
pub const A1111_SAMPLERS: &[(&str, SchedulerKind, &[&str])] = &[
    ("Euler a", SchedulerKind::EulerAncestral, &["k_euler_a", "k_euler_ancestral"]),
    ("Euler", SchedulerKind::Euler, &["k_euler"]),
    ("DDIM", SchedulerKind::Ddim, &[]),
    ("DPM++ 2M", SchedulerKind::DpmSolverMultistep, &["k_dpmpp_2m"]),
    ("UniPC", SchedulerKind::UniPc, &[]),
    ("PLMS", SchedulerKind::Pndm, &["PNDM"]),
    ("Heun", SchedulerKind::Heun, &["k_heun"]),
    ("LMS", SchedulerKind::Lms, &["k_lms"]),
    ("DPM2", SchedulerKind::KDpm2, &["k_dpm_2"]),
    ("DPM2 a", SchedulerKind::KDpm2Ancestral, &["k_dpm_2_a"]),
    ("DPM++ 2M SDE", SchedulerKind::DpmSolverMultistepSde, &["k_dpmpp_2m_sde"]),
    ("DPM++ SDE", SchedulerKind::DpmSolverSde, &["k_dpmpp_sde"]),
];

/// A scheduler and, optionally, the sigma spacing to force on it. Without one, the model's scheduler config
/// decides (a `scheduler_config.json` may itself set `use_karras_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sampler {
    pub kind: SchedulerKind,
    pub sigmas: Option<SigmaSpacing>,
}

impl From<SchedulerKind> for Sampler {
    fn from(kind: SchedulerKind) -> Self {
        Self { kind, sigmas: None }
    }
}

impl Sampler {
    /// A scheduler with a forced sigma spacing; an error if diffusers' class has no such option.
    pub fn new(kind: SchedulerKind, sigmas: Option<SigmaSpacing>) -> Result<Self> {
        if sigmas.is_some() && !respaces(kind) {
            let which = SchedulerKind::ALL.into_iter().filter(|&k| respaces(k)).map(|k| k.cli_name());
            return Err(Error::setting(
                "scheduler",
                format!(
                    "{} ({}) has no {} sigmas in diffusers; schedulers that do: {}",
                    kind.cli_name(),
                    kind.class_name(),
                    sigmas.map_or("", |s| s.a1111_suffix()),
                    which.collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(Self { kind, sigmas })
    }

    /// Our name: the scheduler's CLI name, plus `-karras` / `-exponential` (what image metadata records).
    pub fn cli_name(&self) -> String {
        match self.sigmas {
            None => self.kind.cli_name().to_string(),
            Some(s) => format!("{}-{}", self.kind.cli_name(), s.cli_suffix()),
        }
    }

    /// A1111's name ("DPM++ 2M Karras").
    pub fn a1111_name(&self) -> String {
        let base = A1111_SAMPLERS.iter().find(|(_, k, _)| *k == self.kind).map_or(self.kind.cli_name(), |(n, _, _)| n);
        match self.sigmas {
            None => base.to_string(),
            Some(s) => format!("{base} {}", s.a1111_suffix()),
        }
    }

    /// The config the scheduler is built from: `config` with this spacing switched on and the other respacing
    /// flags off (as `Class.from_config(config, use_karras_sigmas=True)` would be called).
    pub fn apply(&self, config: &SchedulerConfig) -> SchedulerConfig {
        let Some(spacing) = self.sigmas else { return config.clone() };
        let mut config = config.clone();
        for s in SigmaSpacing::ALL {
            config = config.with(s.config_key(), s == spacing);
        }
        config.with("use_beta_sigmas", false)
    }

    /// Every accepted spelling, for error messages.
    fn valid_names() -> String {
        let ours = SchedulerKind::ALL.map(|k| k.cli_name()).join(", ");
        let respacing = SchedulerKind::ALL.into_iter().filter(|&k| respaces(k)).map(|k| k.cli_name());
        let a1111 = A1111_SAMPLERS.iter().map(|(n, _, _)| *n).collect::<Vec<_>>().join(", ");
        format!(
            "ours: {ours} (add -karras or -exponential to {}); A1111's: {a1111} (add \" Karras\" or \" Exponential\" \
             where ours allow it)",
            respacing.collect::<Vec<_>>().join(", ")
        )
    }
}

/// Whether `kind` takes a forced sigma spacing: diffusers' class has `use_karras_sigmas` /
/// `use_exponential_sigmas`, and A1111 lists a Karras variant where it has the sampler (not for Heun, whose
/// diffusers class has the option too).
fn respaces(kind: SchedulerKind) -> bool {
    matches!(
        kind,
        SchedulerKind::Euler
            | SchedulerKind::DpmSolverMultistep
            | SchedulerKind::UniPc
            | SchedulerKind::Lms
            | SchedulerKind::KDpm2
            | SchedulerKind::KDpm2Ancestral
            | SchedulerKind::DpmSolverMultistepSde
            | SchedulerKind::DpmSolverSde
    )
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.cli_name())
    }
}

impl FromStr for Sampler {
    type Err = Error;

    /// Ours (`dpm++2m`, `dpm++2m-karras`) or A1111's ("DPM++ 2M Karras", "k_euler_a"), case-insensitively.
    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_lowercase();
        let unknown = || Error::setting("scheduler", format!("unknown scheduler {s:?}; {}", Sampler::valid_names()));
        let find = |name: &str| -> Option<SchedulerKind> {
            SchedulerKind::ALL.into_iter().find(|k| k.cli_name() == name).or_else(|| {
                A1111_SAMPLERS
                    .iter()
                    .find(|(n, _, aliases)| {
                        n.to_lowercase() == name || aliases.iter().any(|a| a.to_lowercase() == name)
                    })
                    .map(|(_, k, _)| *k)
            })
        };
        if let Some(kind) = find(&wanted) {
            return Ok(kind.into());
        }
        for spacing in SigmaSpacing::ALL {
            let ours = wanted.strip_suffix(&format!("-{}", spacing.cli_suffix()));
            let a1111 = wanted.strip_suffix(&format!(" {}", spacing.cli_suffix()));
            if let Some(kind) = ours.or(a1111).and_then(find) {
                return Sampler::new(kind, Some(spacing));
            }
        }
        Err(unknown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Sampler {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn our_names_and_a1111_names_parse() {
        use SchedulerKind::*;
        for kind in SchedulerKind::ALL {
            assert_eq!(parse(kind.cli_name()), Sampler::from(kind));
        }
        let karras = |kind| Sampler { kind, sigmas: Some(SigmaSpacing::Karras) };
        assert_eq!(parse("DPM++ 2M Karras"), karras(DpmSolverMultistep));
        assert_eq!(parse("dpm++ 2m karras"), karras(DpmSolverMultistep));
        assert_eq!(parse("dpm++2m-karras"), karras(DpmSolverMultistep));
        assert_eq!(parse("Euler Karras"), karras(Euler));
        assert_eq!(parse("UniPC Exponential"), Sampler { kind: UniPc, sigmas: Some(SigmaSpacing::Exponential) });
        assert_eq!(parse("euler-exponential"), Sampler { kind: Euler, sigmas: Some(SigmaSpacing::Exponential) });
        assert_eq!(parse("Euler a"), Sampler::from(EulerAncestral));
        assert_eq!(parse(" k_euler_a "), Sampler::from(EulerAncestral));
        assert_eq!(parse("DDIM"), Sampler::from(Ddim));
        assert_eq!(parse("PLMS"), Sampler::from(Pndm));
        assert_eq!(parse("DPM++ 2M"), Sampler::from(DpmSolverMultistep));
        assert_eq!(parse("Heun"), Sampler::from(Heun));
        assert_eq!(parse("k_lms"), Sampler::from(Lms));
        assert_eq!(parse("LMS Karras"), karras(Lms));
        assert_eq!(parse("DPM2"), Sampler::from(KDpm2));
        assert_eq!(parse("DPM2 Karras"), karras(KDpm2));
        assert_eq!(parse("DPM2 a"), Sampler::from(KDpm2Ancestral));
        assert_eq!(parse("dpm2-a-karras"), karras(KDpm2Ancestral));
        assert_eq!(parse("DPM2 a Karras"), karras(KDpm2Ancestral));
        assert_eq!(parse("DPM++ 2M SDE"), Sampler::from(DpmSolverMultistepSde));
        assert_eq!(parse("DPM++ 2M SDE Karras"), karras(DpmSolverMultistepSde));
        assert_eq!(parse("dpm++2m-sde-karras"), karras(DpmSolverMultistepSde));
    }

    /// DPM++ SDE by our name and A1111's, with and without Karras sigmas.
    #[test]
    fn dpmpp_sde_names() {
        use SchedulerKind::DpmSolverSde;
        let karras = Sampler { kind: DpmSolverSde, sigmas: Some(SigmaSpacing::Karras) };
        assert_eq!(parse("DPM++ SDE"), Sampler::from(DpmSolverSde));
        assert_eq!(parse("k_dpmpp_sde"), Sampler::from(DpmSolverSde));
        assert_eq!(parse("dpm++sde"), Sampler::from(DpmSolverSde));
        assert_eq!(parse("DPM++ SDE Karras"), karras);
        assert_eq!(parse("dpm++sde-karras"), karras);
        assert_eq!(karras.a1111_name(), "DPM++ SDE Karras");
        assert_eq!(karras.cli_name(), "dpm++sde-karras");
    }

    #[test]
    fn names_round_trip() {
        for kind in SchedulerKind::ALL {
            let spacings = if respaces(kind) {
                vec![None, Some(SigmaSpacing::Karras), Some(SigmaSpacing::Exponential)]
            } else {
                vec![None]
            };
            for sigmas in spacings {
                let sampler = Sampler::new(kind, sigmas).unwrap();
                assert_eq!(parse(&sampler.cli_name()), sampler);
                assert_eq!(parse(&sampler.a1111_name()), sampler);
                assert_eq!(sampler.to_string(), sampler.cli_name());
            }
        }
        assert_eq!(Sampler::from(SchedulerKind::DpmSolverMultistep).cli_name(), "dpm++2m");
        let karras = Sampler::new(SchedulerKind::DpmSolverMultistep, Some(SigmaSpacing::Karras)).unwrap();
        assert_eq!(karras.a1111_name(), "DPM++ 2M Karras");
        assert_eq!(karras.cli_name(), "dpm++2m-karras");
    }

    #[test]
    fn unknown_names_list_both_spellings() {
        let err = "DPM fast".parse::<Sampler>().unwrap_err().to_string();
        assert!(err.contains("\"DPM fast\"") && err.contains("scheduler"), "{err}");
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.cli_name()), "{err}");
        }
        for (name, _, _) in A1111_SAMPLERS {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn spacing_on_a_scheduler_without_it_is_refused() {
        for name in ["Euler a Karras", "ddim-exponential", "PLMS Karras", "Heun Karras"] {
            let err = name.parse::<Sampler>().unwrap_err().to_string();
            assert!(err.contains("no ") && err.contains("dpm++2m"), "{name}: {err}");
        }
    }

    #[test]
    fn apply_switches_the_other_spacing_off() {
        let cfg = SchedulerConfig::from_json_str(r#"{"use_karras_sigmas": true}"#, "s.json").unwrap();
        let exp = Sampler::new(SchedulerKind::Euler, Some(SigmaSpacing::Exponential)).unwrap().apply(&cfg);
        assert_eq!(exp.get("use_karras_sigmas"), Some(&serde_json::Value::Bool(false)));
        assert_eq!(exp.get("use_exponential_sigmas"), Some(&serde_json::Value::Bool(true)));
        // No forced spacing: the config's own choice stands.
        let own = Sampler::from(SchedulerKind::Euler).apply(&cfg);
        assert_eq!(own.get("use_karras_sigmas"), Some(&serde_json::Value::Bool(true)));
    }
}

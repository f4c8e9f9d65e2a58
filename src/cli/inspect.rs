//! `controlnet inspect PATH [--json]`: what a weights file or model folder is, from headers only.
use std::fmt::Write;
use std::path::PathBuf;

use clap::Args;

use crate::io::inspect::{inspect, Inspection};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A weights file (.safetensors, .pth, .ckpt, .bin), a diffusers folder, or a hub id
    /// (owner/name[@revision][/file], fetched into the Hugging Face cache).
    pub path: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let path = crate::io::hub::resolve(&args.path.to_string_lossy(), None)?;
    let i = inspect(&path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", render(&i));
    }
    Ok(())
}

/// The text report: one `field: value` line each, lists after.
pub fn render(i: &Inspection) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}: {}", i.path.display(), i.description);
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{:<24}{v}", format!("{k}:"));
    };
    line("kind", i.kind.to_string());
    line("base", i.base.to_string());
    line("format", format!("{} ({})", i.format, i.container));
    line("parameters", format!("{} ({:.1} M)", i.parameters, i.parameters as f64 / 1e6));
    line("dtype", i.dtype.clone().unwrap_or_else(|| "-".into()));
    line("tensors", format!("{} ({} ignored)", i.tensors, i.ignored_tensors));
    if let Some(w) = i.cross_attention_dim {
        line("cross-attention width", w.to_string());
    }
    if let Some(p) = i.projection {
        line("projection", format!("{p:?}").to_lowercase());
    }
    if let Some(c) = i.conditioning_channels {
        line("conditioning channels", c.to_string());
        let hint: Vec<String> = i.hint_channels.iter().map(usize::to_string).collect();
        line("hint channels", hint.join(", "));
        line("global pooling", i.global_pool_conditions.to_string());
    }
    if let Some(v) = &i.version {
        line("version", v.clone());
    }
    line("unrecognised keys", i.unrecognised_count.to_string());
    for k in &i.unrecognised {
        let _ = writeln!(s, "  {k}");
    }
    if i.unrecognised_count > i.unrecognised.len() {
        let _ = writeln!(s, "  ... and {} more", i.unrecognised_count - i.unrecognised.len());
    }
    for n in &i.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_report_names_the_essentials() {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load/control_tiny_sd15_fp16.pth");
        let text = render(&inspect(&p).unwrap());
        assert!(text.contains("a ControlNet (original names)"), "{text}");
        let field = |k: &str| {
            let line = text.lines().find(|l| l.starts_with(&format!("{k}:"))).unwrap_or_else(|| panic!("{k} missing"));
            line[k.len() + 1..].trim().to_string()
        };
        assert_eq!(field("kind"), "ControlNet");
        assert_eq!(field("format"), "original (torch zip pickle)");
        assert_eq!(field("dtype"), "f16");
        assert_eq!(field("hint channels"), "16, 32, 96, 256");
        assert_eq!(field("unrecognised keys"), "0");
        assert!(field("parameters").starts_with("886640 "));
        let json: serde_json::Value = serde_json::to_value(inspect(&p).unwrap()).unwrap();
        assert_eq!(json["kind"], "controlnet");
        assert_eq!(json["format"], "original");
        assert!(json["parameters"].is_u64());
    }
}

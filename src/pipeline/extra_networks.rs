//! A1111's LoRA tags in prompts: `<lora:name:0.8>` (weight 1 when left out) names `name.safetensors` in the
//! LoRA folder (`lora_dir`, searched with its subfolders, as A1111's `models/Lora`). The tags are taken out
//! of the prompt text before it is encoded, as A1111 does, and join the request's `loras`.
//!
//! The multipliers follow A1111's `extensions-builtin/Lora/extra_networks_lora.py`: the fields after the name
//! split at `:`; one with `=` is named (`te=`, `unet=`), the others positional. The first positional is the
//! text encoders' multiplier (1 when absent), the second the UNet's (the text encoders' when absent); `te=` and
//! `unet=` override them. `<lora:name:0.5:1>` and `<lora:name:unet=1:te=0.5>` are the same.
use std::path::{Path, PathBuf};

use super::request::{GenerateRequest, LoraRequest};
use crate::io::lora::LoraWeight;
use crate::{Error, Result};

/// The tag name A1111 gives LoRAs.
const LORA_TAG: &str = "lora";

/// One `<lora:name:weight>` tag as written.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: LoraWeight,
    /// The tag as written (for errors).
    pub text: String,
}

/// `prompt` without its `<lora:…>` tags, and the tags in order. Other `<…>` text is left alone. A weight that
/// is not a number is an error naming `setting`.
pub fn extract_lora_tags(prompt: &str, setting: &str) -> Result<(String, Vec<LoraTag>)> {
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('>') else { break };
        let inner = &after[..end];
        let mut fields = inner.split(':');
        if fields.next() != Some(LORA_TAG) {
            text.push_str(&rest[..start + 1]);
            rest = after;
            continue;
        }
        let tag_text = format!("<{inner}>");
        let name = fields.next().unwrap_or_default().trim().to_string();
        if name.is_empty() {
            return Err(Error::setting(setting, format!("{tag_text}: the tag names no LoRA")));
        }
        let fields: Vec<&str> = fields.collect();
        let weight = multipliers(&fields).map_err(|why| Error::setting(setting, format!("{tag_text}: {why}")))?;
        text.push_str(&rest[..start]);
        tags.push(LoraTag { name, weight, text: tag_text });
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    Ok((text, tags))
}

/// A1111's multipliers from a tag's fields after the name (see the module docs); the error says why not.
fn multipliers(fields: &[&str]) -> std::result::Result<LoraWeight, String> {
    let number = |w: &str| {
        let w = w.trim();
        w.parse::<f64>().ok().filter(|w| w.is_finite()).ok_or_else(|| format!("the weight {w:?} is not a number"))
    };
    let (mut positional, mut te, mut unet) = (Vec::new(), None, None);
    for field in fields {
        match field.split_once('=') {
            Some(("te", w)) => te = Some(number(w)?),
            Some(("unet", w)) => unet = Some(number(w)?),
            Some((name, _)) => return Err(format!("{name}= is not supported (te= and unet= are)")),
            // `<lora:name:>` as `<lora:name>`.
            None if field.trim().is_empty() && positional.is_empty() => {}
            None => positional.push(number(field)?),
        }
    }
    if positional.len() > 2 {
        return Err("a third number (A1111's dyn rank) is not supported: give TE and UNET multipliers".into());
    }
    let te = te.unwrap_or(positional.first().copied().unwrap_or(1.0));
    let unet = unet.unwrap_or(positional.get(1).copied().unwrap_or(te));
    Ok(LoraWeight { text_encoder: te, unet })
}

/// `request` with the LoRA tags of its prompts resolved against `lora_dir` and added to `loras` (after the
/// ones given as files), and taken out of the prompt texts. An unknown name is an error naming the tag and
/// the folder.
pub fn resolve_lora_tags(request: &GenerateRequest) -> Result<GenerateRequest> {
    let mut out = request.clone();
    for setting in ["prompt", "negative_prompt"] {
        let text = if setting == "prompt" { &request.prompt } else { &request.negative_prompt };
        let (clean, tags) = extract_lora_tags(text, setting)?;
        for tag in tags {
            let path = find_lora(request.lora_dir.as_deref(), &tag, setting)?;
            out.loras.push(LoraRequest { path, weight: tag.weight });
        }
        if setting == "prompt" {
            out.prompt = clean;
        } else {
            out.negative_prompt = clean;
        }
    }
    Ok(out)
}

/// `name.safetensors` in `dir` or a subfolder of it.
fn find_lora(dir: Option<&Path>, tag: &LoraTag, setting: &str) -> Result<PathBuf> {
    let Some(dir) = dir else {
        return Err(Error::setting(
            setting,
            format!("{} names a LoRA, but no LoRA folder was given (lora_dir)", tag.text),
        ));
    };
    let file = format!("{}.safetensors", tag.name);
    find_in(dir, &file).ok_or_else(|| {
        Error::setting(
            setting,
            format!("{}: no LoRA named {:?} ({file}) in the LoRA folder {}", tag.text, tag.name, dir.display()),
        )
    })
}

fn find_in(dir: &Path, file: &str) -> Option<PathBuf> {
    let direct = dir.join(file);
    if direct.is_file() {
        return Some(direct);
    }
    let mut subdirs: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    subdirs.sort();
    subdirs.iter().find_map(|d| find_in(d, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_taken_out_with_their_weights() {
        let (text, tags) = extract_lora_tags("a cat <lora:ink:0.8>, <b> sky <lora:film>", "prompt").unwrap();
        assert_eq!(text, "a cat , <b> sky ");
        let uniform = LoraWeight::uniform;
        assert_eq!(
            tags.iter().map(|t| (t.name.as_str(), t.weight)).collect::<Vec<_>>(),
            [("ink", uniform(0.8)), ("film", uniform(1.0))]
        );
        let err = extract_lora_tags("x <lora:ink:strong>", "prompt").unwrap_err().to_string();
        assert!(err.contains("<lora:ink:strong>") && err.contains("not a number"), "{err}");
    }

    /// A1111's `<lora:name:TE:UNET>` and its `te=` / `unet=` names (extra_networks_lora.py).
    #[test]
    fn text_encoder_and_unet_multipliers_as_a1111() {
        let weight = |tag: &str| extract_lora_tags(tag, "prompt").map(|(_, t)| t[0].weight);
        let w = |te, unet| LoraWeight { text_encoder: te, unet };
        assert_eq!(weight("<lora:ink>").unwrap(), w(1.0, 1.0));
        assert_eq!(weight("<lora:ink:0.5>").unwrap(), w(0.5, 0.5));
        assert_eq!(weight("<lora:ink:0.5:1.2>").unwrap(), w(0.5, 1.2));
        assert_eq!(weight("<lora:ink:unet=0.3>").unwrap(), w(1.0, 0.3));
        assert_eq!(weight("<lora:ink:te=0.2>").unwrap(), w(0.2, 0.2));
        assert_eq!(weight("<lora:ink:0.5:unet=0.3>").unwrap(), w(0.5, 0.3));
        assert_eq!(weight("<lora:ink:unet=1.2:te=0.5>").unwrap(), w(0.5, 1.2));
        assert_eq!(weight("<lora:ink:0.1:0.2:te=0.5>").unwrap(), w(0.5, 0.2));
        for (bad, why) in [
            ("<lora:ink:0.5:1:8>", "dyn"),
            ("<lora:ink:dyn=8>", "dyn= is not supported"),
            ("<lora:ink:unet=x>", "not a number"),
        ] {
            let err = weight(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn unknown_name_names_tag_and_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("style")).unwrap();
        std::fs::write(dir.path().join("style/ink.safetensors"), b"x").unwrap();
        let request = GenerateRequest {
            prompt: "a cat <lora:ink:0.5>".into(),
            negative_prompt: "<lora:ink>".into(),
            lora_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let resolved = resolve_lora_tags(&request).unwrap();
        assert_eq!(resolved.prompt, "a cat ");
        assert_eq!(resolved.negative_prompt, "");
        assert_eq!(resolved.loras.len(), 2);
        assert!(resolved.loras[0].path.ends_with("style/ink.safetensors"));
        assert_eq!(resolved.loras[0].weight, LoraWeight::uniform(0.5));
        let bad = GenerateRequest { prompt: "<lora:nope:1>".into(), ..request };
        let err = resolve_lora_tags(&bad).unwrap_err().to_string();
        assert!(err.contains("<lora:nope:1>") && err.contains(&dir.path().display().to_string()), "{err}");
    }
}

//! Parity with controlnet_aux 0.0.10 on the fixtures of `tools/fixtures/gen_openpose.py`: the nets on random
//! weights (narrow widths, the published key names), and the post-processing on crafted net outputs where two
//! people, three hands and two faces are found.
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::*;
use crate::annotate::neural::test_support::assert_net_close;
use crate::annotate::{annotate_upstream, resize, UpstreamSizes};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openpose");

fn weights() -> String {
    format!("{DIR}/weights")
}

fn load(name: &str) -> RgbImage {
    image::open(format!("{DIR}/{name}")).unwrap().to_rgb8()
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{DIR}/{name}"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

#[derive(Deserialize)]
struct MapCase {
    file: String,
    body: bool,
    hand: bool,
    face: bool,
    nonzero: usize,
}

#[derive(Deserialize)]
struct Case {
    input: String,
    detect_resolution: u32,
    image_resolution: u32,
    json: String,
    maps: HashMap<String, MapCase>,
    people: usize,
}

fn case(name: &str) -> Case {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/{name}.json")).unwrap()).unwrap()
}

/// The crafted net outputs, looked up by the input's size as the reference's stand-in nets made them.
struct StoredNets(HashMap<String, Tensor>);

impl StoredNets {
    fn get(&self, what: &str, x: &Tensor) -> Tensor {
        let (_, _, h, w) = x.dims4().unwrap();
        let key = format!("{what}_{h}x{w}");
        self.0.get(&key).unwrap_or_else(|| panic!("the reference never ran the {what} net on {h}x{w}")).clone()
    }
}

impl PoseNets for StoredNets {
    fn body(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.get("body_paf", x), self.get("body_heatmap", x)))
    }
    fn hand(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.get("hand", x))
    }
    fn face(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.get("face", x))
    }
}

fn crafted(include: Include) -> Openpose {
    Openpose { nets: Box::new(StoredNets(tensors("crafted_nets.safetensors"))), include }
}

const ALL: Include = Include { body: true, hand: true, face: true };

/// The map with controlnet_aux's sizes against the reference: at most 1% of the samples more than 2 levels
/// off (the final linear resize differs by a level on some samples), and as many drawn samples within 1%.
fn assert_map(d: &Openpose, c: &Case, m: &MapCase) {
    let sizes =
        UpstreamSizes { detect_resolution: Some(c.detect_resolution), image_resolution: Some(c.image_resolution) };
    let ours = annotate_upstream(d, &load(&c.input), &sizes).unwrap();
    let reference = load(&m.file);
    assert_eq!(ours.dimensions(), reference.dimensions(), "{}: size", m.file);
    let off = ours.as_raw().iter().zip(reference.as_raw()).filter(|(&a, &b)| a.abs_diff(b) > 2).count();
    let share = off as f64 / ours.as_raw().len() as f64;
    let nonzero = ours.as_raw().iter().filter(|&&v| v > 0).count();
    eprintln!("{}: {:.3}% off by > 2, {nonzero} drawn (reference {})", m.file, share * 100.0, m.nonzero);
    assert!(share <= 0.01, "{}: {:.3}% of samples off by more than 2 levels", m.file, share * 100.0);
    assert!(nonzero.abs_diff(m.nonzero) as f64 <= 0.01 * m.nonzero.max(100) as f64, "{}: drawn samples", m.file);
}

#[test]
fn nets_match_controlnet_aux_on_random_weights() {
    let nets = OpenposeNets::load(Some(&weights()), ALL).unwrap();
    let reference = tensors("random_net.safetensors");
    // the body net's input as Body.__call__ makes it from the detect image
    let (x, _) = body::net_input(&bgr(&load("random_net_input.png"))).unwrap();
    let d = (&x - &reference["body_input"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-6, "body input differs by {d}");
    let (paf, heatmap) = nets.body(&x).unwrap();
    assert_net_close(&paf, &reference["body_paf"], "body PAFs");
    assert_net_close(&heatmap, &reference["body_heatmap"], "body heatmaps");
    let crop = &reference["crop_input"];
    assert_net_close(&nets.hand(crop).unwrap(), &reference["hand"], "hand heatmaps");
    assert_net_close(&nets.face(crop).unwrap(), &reference["face"], "face heatmaps");
}

#[test]
fn detector_on_random_weights_matches_controlnet_aux() {
    let c = case("random");
    let d = Openpose::load(Some(&weights()), ALL).unwrap();
    for m in c.maps.values() {
        assert_map(&d, &c, m);
    }
    let detect = resize::controlnet_aux_resize(&Mat::from_rgb(&load(&c.input)), c.detect_resolution).to_rgb();
    let ours = d.detect_poses(&detect).unwrap();
    let reference = PoseFile::from_json_file(&PathBuf::from(DIR).join(&c.json)).unwrap();
    assert_eq!(ours.people.len(), c.people);
    assert_eq!(ours, reference);
}

/// Candidates (x, y, score, id) as the reference's `candidate` array.
fn assert_candidates(ours: &[body::Peak], reference: &Tensor) {
    let cand = reference.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(ours.len(), cand.len(), "candidates");
    for (ours, r) in ours.iter().zip(&cand) {
        assert_eq!((ours.x as f64, ours.y as f64, ours.id as f64), (r[0], r[1], r[3]), "{ours:?} vs {r:?}");
        assert!((ours.score - r[2]).abs() < 1e-5, "{ours:?} vs {r:?}");
    }
}

#[test]
fn random_body_maps_give_the_reference_peaks() {
    // noise heatmaps: hundreds of peaks, none joined into a person
    let reference = tensors("random_net.safetensors");
    let d = Openpose::load(Some(&weights()), Include { body: true, hand: false, face: false }).unwrap();
    let found = d.body(&bgr(&load("random_net_input.png"))).unwrap();
    assert!(found.candidates.len() > 100, "{} peaks", found.candidates.len());
    assert_candidates(&found.candidates, &reference["candidate"]);
}

#[test]
fn crafted_body_finds_the_reference_candidates_and_people() {
    let reference = tensors("crafted_body.safetensors");
    let c = case("crafted");
    let detect = resize::controlnet_aux_resize(&Mat::from_rgb(&load(&c.input)), c.detect_resolution).to_rgb();
    let found = crafted(ALL).body(&bgr(&detect)).unwrap();
    assert_candidates(&found.candidates, &reference["candidate"]);
    let subset = reference["subset"].to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    assert!(subset.len() >= 2, "the crafted case has two people");
    assert_eq!(found.people.len(), subset.len(), "people");
    for (p, r) in found.people.iter().zip(&subset) {
        let joints: Vec<f64> = p.joints.iter().map(|j| j.map_or(-1.0, |v| v as f64)).collect();
        assert_eq!(joints, r[..18].to_vec());
        assert!((p.score - r[18]).abs() < 1e-4 && p.parts == r[19], "{p:?} vs {r:?}");
    }
}

#[test]
fn crafted_pose_json_matches_a1111s() {
    let c = case("crafted");
    let detect = resize::controlnet_aux_resize(&Mat::from_rgb(&load(&c.input)), c.detect_resolution).to_rgb();
    let ours = crafted(ALL).detect_poses(&detect).unwrap();
    let reference = PoseFile::from_json_file(&PathBuf::from(DIR).join(&c.json)).unwrap();
    assert_eq!(reference.people.len(), c.people);
    let hands = reference.people.iter().flat_map(|p| [&p.left_hand, &p.right_hand]).flatten().count();
    assert!(hands >= 2 && reference.people.iter().any(|p| p.face.is_some()), "hands and a face in the reference");
    assert_eq!((ours.canvas_width, ours.canvas_height), (reference.canvas_width, reference.canvas_height));
    assert_eq!(ours.people.len(), reference.people.len());
    for (i, (a, b)) in ours.people.iter().zip(&reference.people).enumerate() {
        for (g, (x, y)) in a.groups().iter().zip(b.groups()).enumerate() {
            assert_eq!(x.is_some(), y.is_some(), "person {i} group {g}: present");
            if let (Some(x), Some(y)) = (x, y) {
                assert_eq!(x.len(), y.len(), "person {i} group {g}: points");
                for (k, (p, q)) in x.iter().zip(y).enumerate() {
                    assert_eq!(p, q, "person {i} group {g} point {k}");
                }
            }
        }
    }
    // what we write reads back to the same pose
    assert_eq!(PoseFile::from_json_str(&ours.to_json_string()).unwrap(), ours);
}

#[test]
fn crafted_maps_match_every_include_option() {
    let c = case("crafted");
    for m in c.maps.values() {
        let d = crafted(Include { body: m.body, hand: m.hand, face: m.face });
        assert_map(&d, &c, m);
    }
}

#[test]
fn kinds_choose_the_parts() {
    assert_eq!(Include::for_kind("openpose", None, false, false), Include { body: true, hand: false, face: false });
    assert_eq!(Include::for_kind("openpose-full", None, false, false), ALL);
    assert_eq!(
        Include::for_kind("openpose-face", Some(false), false, false),
        Include { body: false, hand: false, face: true }
    );
    assert_eq!(Include::for_kind("openpose", None, true, false), Include { body: true, hand: true, face: false });
}

#[test]
fn a_folder_without_the_hand_net_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{DIR}/weights/{BODY_FILE}"), dir.path().join(BODY_FILE)).unwrap();
    let d = dir.path().to_str().unwrap();
    assert!(Openpose::load(Some(d), Include { body: true, hand: false, face: false }).is_ok());
    let err = Openpose::load(Some(d), ALL).err().unwrap().to_string();
    assert!(err.contains("hand_pose_model.pth"), "{err}");
    let err = OpenposeNets::load(
        Some(&format!("{DIR}/weights/{FACE_FILE}")),
        Include { body: true, hand: false, face: false },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("not body_pose_model.pth"), "{err}");
}

"""The Detectron2 extension against real Detectron2 models (random weights, CPU, tiny sizes) on generated data."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "detectron2",
    reason="detectron2 is not installed (it is not on PyPI; build it from source as the README says) - "
    "the Detectron2 extension tests need it",
)

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.evaluation import inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from crm_d2.checkpoint import save_checkpoint  # noqa: E402
from crm_d2.d2 import (  # noqa: E402
    BASE_OUTPUTS_KEY,
    CRMInstanceEvaluator,
    CRMPanopticEvaluator,
    build_crm_evaluator,
    get_crm_cfg,
    register_coco_panoptic_crm,
    register_entity_crm,
    return_base_outputs,
)
from crm_d2.model import CRM, CRMConfig  # noqa: E402
from crm_d2.panoptic.coco import PanopticSet, load_panoptic  # noqa: E402
from crm_d2.panoptic.per_category import panoptic_per_category  # noqa: E402
from crm_d2.panoptic.pq import pq_compute  # noqa: E402
from test_report import parse_page  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Small ResNet-18 FPN heads, few proposals, thresholds at 0 so random weights still give segments.
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "3",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.CRM.SCALES", "[0.5, 1.0]", "MODEL.CRM.MIN_AREA", "16",
]
PANOPTIC_TINY = TINY + [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", "0.0",
    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", "400",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Shared CPUs: one thread is much faster than oversubscribed ones for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny generated COCO val (panoptic PNG/JSON, instances JSON, entity GT) registered under test names."""
    root = tmp_path_factory.mktemp("d2data")
    paths = _load_script("make_tiny_coco").make_tiny_coco(str(root), num_images=3)
    entity_json = root / "entity.json"
    assert _load_script("prepare_entity_gt").main(["--root", str(root), "--output", str(entity_json)]) == 0
    names = {"panoptic": "crm_test_panoptic", "instances": "crm_test_instances", "entity": "crm_test_entity"}
    for name in names.values():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
    register_coco_panoptic_crm(names["panoptic"], paths["image_root"], paths["panoptic_root"], paths["panoptic_json"])
    register_coco_instances(names["instances"], {}, paths["instances_json"], paths["image_root"])
    register_entity_crm(names["entity"], paths["image_root"], str(entity_json))
    return {"root": root, "names": names, "entity_json": entity_json, **paths}


@pytest.fixture(scope="module")
def crm_weights(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CRMConfig.preset("tiny")
    return str(save_checkpoint(tmp_path_factory.mktemp("crm") / "crm_tiny.pth", CRM(cfg), cfg))


def _cfg(config, opts):
    cfg = get_crm_cfg(str(CONFIGS / config), opts)
    cfg.freeze()
    return cfg


def _models(config, opts, crm_weights, base_meta):
    """The plain base model and the CRMPostRefiner with CRM off and on, all with the same random weights."""
    torch.manual_seed(0)
    plain = build_model(_cfg(config, opts + ["MODEL.META_ARCHITECTURE", base_meta]))
    off = build_model(_cfg(config, opts + ["MODEL.CRM.ENABLED", "False"]))
    on = build_model(_cfg(config, opts + ["MODEL.CRM.WEIGHTS", crm_weights]))
    state = plain.state_dict()
    for m in (off, on):
        assert m.state_dict().keys() == state.keys()  # base checkpoints load unchanged
        m.load_state_dict(state)
    return [m.eval() for m in (plain, off, on)]


def _run(model, loader):
    outs = []
    with torch.no_grad(), return_base_outputs(model):
        for batch in loader:
            outs.extend(zip(batch, model(batch)))
    return outs


def _masks(inst):
    m = inst.pred_masks
    return (m.tensor if isinstance(m, BitMasks) else m).cpu()


def _assert_same(a, b):
    """Bit-for-bit equality of two Detectron2 output dicts."""
    assert a.keys() == b.keys()
    if "panoptic_seg" in a:
        assert torch.equal(a["panoptic_seg"][0], b["panoptic_seg"][0])
        assert a["panoptic_seg"][1] == b["panoptic_seg"][1]
    if "sem_seg" in a:
        assert torch.equal(a["sem_seg"], b["sem_seg"])
    if "instances" in a:
        fa, fb = a["instances"].get_fields(), b["instances"].get_fields()
        assert fa.keys() == fb.keys()
        for k in fa:
            va, vb = fa[k], fb[k]
            va, vb = (getattr(va, "tensor", va), getattr(vb, "tensor", vb))
            assert torch.equal(va, vb), k


def _check_panoptic_files(out_dir, data, expected, meta):
    """predictions.json and PNGs agree, ids valid, sizes those of the GT, contents and (dataset) category ids
    those of the model outputs in `expected`."""
    pred = load_panoptic(os.path.join(out_dir, "predictions.json"))
    gt = PanopticSet(data["panoptic_json"], data["panoptic_root"])
    assert set(pred.annotations) == set(gt.annotations)
    to_dataset = {True: {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()},
                  False: {v: k for k, v in meta.stuff_dataset_id_to_contiguous_id.items()}}
    for image_id, ann in pred.annotations.items():
        ids = pred.read_ids(ann)  # raises if PNG and JSON disagree or a category is unknown
        assert ids.shape == gt.read_ids(gt.annotations[image_id]).shape
        exp_ids, exp_segments = expected[image_id]
        assert np.array_equal(ids, exp_ids)
        assert [(s["id"], s["category_id"]) for s in ann["segments_info"]] == [
            (s["id"], to_dataset[bool(s["isthing"])][s["category_id"]]) for s in exp_segments]


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_evaluators_score_ground_truth_perfectly(data, tmp_path):
    """GT given as model outputs (contiguous ids, as PanopticFPN returns them) scores PQ 100 and AP 100: category
    id conversion, PNG encoding and the GT sources of the evaluators are right."""
    pan_name, inst_name, ent_name = (data["names"][k] for k in ("panoptic", "instances", "entity"))
    DatasetCatalog.get(inst_name)  # loading fills the instances dataset's id map, as the test loader does
    gt = PanopticSet(data["panoptic_json"], data["panoptic_root"])
    inputs, panoptic, things, entities = [], [], [], []
    for d in DatasetCatalog.get(pan_name):
        ids = gt.read_ids(gt.annotations[d["image_id"]]).astype(np.int32)
        segs = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]} for s in d["segments_info"]]
        inputs.append({"file_name": d["file_name"], "image_id": d["image_id"]})
        panoptic.append({"panoptic_seg": (torch.from_numpy(ids), segs)})
        for out, keep in ((things, [s for s in segs if s["isthing"]]), (entities, segs)):
            inst = Instances(ids.shape)
            inst.pred_masks = torch.from_numpy(np.stack([ids == s["id"] for s in keep]))
            inst.scores = torch.ones(len(keep))
            inst.pred_classes = torch.tensor([s["category_id"] for s in keep])
            out.append({"instances": inst})
    res = _evaluate(CRMPanopticEvaluator(pan_name, str(tmp_path / "pan")), inputs, panoptic)["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100) and res["PQ_th"] == pytest.approx(100)
    assert res["PQ_st"] == pytest.approx(100)
    res = _evaluate(CRMInstanceEvaluator(inst_name, class_agnostic=False), inputs, things)["segm"]
    assert res["AP"] == pytest.approx(100)
    res = _evaluate(CRMInstanceEvaluator(ent_name, class_agnostic=True), inputs, entities)["segm"]
    assert res["AP"] == pytest.approx(100)
    # entities from the panoptic GT when a panoptic dataset has no instances JSON
    res = _evaluate(CRMInstanceEvaluator(pan_name, class_agnostic=True), inputs, entities)["segm"]
    assert res["AP"] == pytest.approx(100)
    # a wrong class costs class-aware AP, not entity AP
    for out in things:
        out["instances"].pred_classes = (out["instances"].pred_classes + 1) % 80
    assert _evaluate(CRMInstanceEvaluator(inst_name, class_agnostic=False), inputs, things)["segm"]["AP"] < 50


def test_panoptic_fpn_same_pass(data, crm_weights, tmp_path):
    name = data["names"]["panoptic"]
    opts = PANOPTIC_TINY + ["DATASETS.TEST", f"('{name}',)", "MODEL.CRM.REFINE",
                            "['panoptic_seg', 'instances', 'sem_seg']"]
    plain, off, on = _models("PanopticFPN-R50-CRM.yaml", opts, crm_weights, "PanopticFPN")
    assert type(on).__name__ == "CRMPanopticFPN" and on.crm_refiner is not None and off.crm_refiner is None
    crm_params = {id(p) for p in on.crm_refiner.model.parameters()}
    assert crm_params and not crm_params & {id(p) for p in on.parameters()}  # frozen, outside the module tree
    cfg = _cfg("PanopticFPN-R50-CRM.yaml", opts + ["MODEL.CRM.WEIGHTS", crm_weights])
    loader = build_detection_test_loader(cfg, name)

    base_runs = _run(plain, loader)
    for (_, a), (_, b) in zip(base_runs, _run(off, loader)):
        _assert_same(a, b)  # CRM disabled: the base model bit for bit, no extra keys

    evaluator = build_crm_evaluator(cfg, name, str(tmp_path / "eval"))
    refined_runs = []

    class Recorder:  # keeps what the evaluator saw, to check it below
        def reset(self):
            evaluator.reset()

        def process(self, inputs, outputs):
            refined_runs.extend(zip(inputs, outputs))
            evaluator.process(inputs, outputs)

        def evaluate(self):
            return evaluator.evaluate()

    with return_base_outputs(on):
        results = inference_on_dataset(on, loader, Recorder())

    changed = 0
    expected_base, expected_crm = {}, {}
    for (inp, ref), (_, base) in zip(refined_runs, base_runs):
        _assert_same(ref[BASE_OUTPUTS_KEY], base)  # same forward: the base outputs are untouched
        assert set(ref) == set(base) | {BASE_OUTPUTS_KEY}
        h, w = inp["height"], inp["width"]
        ids, segs = ref["panoptic_seg"]
        assert ids.dtype == base["panoptic_seg"][0].dtype and ids.shape == (h, w)
        by_id = {s["id"]: s for s in base["panoptic_seg"][1]}
        assert set(torch.unique(ids).tolist()) - {0} == {s["id"] for s in segs}
        assert [s["id"] for s in segs] == [s["id"] for s in base["panoptic_seg"][1]]  # no segment is lost
        for s in segs:  # same segments, same keys and classes
            assert s.keys() == by_id[s["id"]].keys()
            assert {k: s[k] for k in ("category_id", "isthing")} == {k: by_id[s["id"]][k] for k in ("category_id",
                                                                                                      "isthing")}
            if "area" in s:
                assert s["area"] == int((ids == s["id"]).sum())
        inst, base_inst = ref["instances"], base["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (h, w) and len(inst) == len(base_inst)
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (h, w)
        # no detection is lost: a mask refined to nothing keeps its base mask
        assert torch.equal(inst.pred_masks.flatten(1).any(dim=1), _masks(base_inst).flatten(1).any(dim=1))
        assert torch.equal(inst.scores, base_inst.scores)
        sem, base_sem = ref["sem_seg"], base["sem_seg"]
        assert sem.shape == base_sem.shape and sem.dtype == base_sem.dtype
        # refined semantic scores are the base scores with the refined class moved to the top
        assert torch.allclose(sem.sort(dim=0).values, base_sem.sort(dim=0).values, atol=1e-5)
        changed += int(not torch.equal(ids, base["panoptic_seg"][0]))
        changed += int(not torch.equal(_masks(inst), _masks(base_inst)))
        expected_base[inp["image_id"]] = (base["panoptic_seg"][0].numpy(), base["panoptic_seg"][1])
        expected_crm[inp["image_id"]] = (ids.numpy(), segs)
    assert changed, "CRM changed nothing: the refinement is not wired in"

    assert set(results) == {"base/panoptic_seg", "crm/panoptic_seg"}
    for res in results.values():
        assert set(res) == {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}
        assert all(0.0 <= v <= 100.0 for v in res.values())
    meta = MetadataCatalog.get(name)
    _check_panoptic_files(tmp_path / "eval" / "base", data, expected_base, meta)
    _check_panoptic_files(tmp_path / "eval" / "crm", data, expected_crm, meta)
    table = (tmp_path / "eval" / "crm_comparison.txt").read_text()
    assert "without CRM" in table and "panoptic_seg/PQ" in table
    saved = json.loads((tmp_path / "eval" / "crm_comparison.json").read_text())
    assert saved["base"]["panoptic_seg"] == results["base/panoptic_seg"]
    # per category: the CLI's computation on the kept files (crm_d2.panoptic.per_category), both sides
    gt = PanopticSet(meta.panoptic_json, meta.panoptic_root)
    sides = [pq_compute(gt, None, str(tmp_path / "eval" / s / "predictions.json"),
                        str(tmp_path / "eval" / s / "predictions")) for s in ("base", "crm")]
    assert saved["per_category"] == json.loads(json.dumps(panoptic_per_category(*sides)))
    assert saved["per_category"] and "gained most PQ with CRM" in table
    assert not (tmp_path / "eval" / "report").exists()  # MODEL.CRM.REPORT is off by default

    # the base column is what a plain evaluation of the plain model gives
    plain_eval = CRMPanopticEvaluator(name, str(tmp_path / "plain"))
    assert inference_on_dataset(plain, loader, plain_eval)["panoptic_seg"] == results["base/panoptic_seg"]


def test_mask_rcnn_same_pass_and_entity_ap(data, crm_weights, tmp_path):
    name = data["names"]["instances"]
    opts = TINY + ["DATASETS.TEST", f"('{name}',)"]
    plain, off, on = _models("MaskRCNN-R50-CRM.yaml", opts, crm_weights, "GeneralizedRCNN")
    cfg = _cfg("MaskRCNN-R50-CRM.yaml", opts + ["MODEL.CRM.WEIGHTS", crm_weights])
    loader = build_detection_test_loader(cfg, name)
    base_runs = _run(plain, loader)
    for (_, a), (_, b) in zip(base_runs, _run(off, loader)):
        _assert_same(a, b)
    changed = 0
    for (inp, ref), (_, base) in zip(_run(on, loader), base_runs):
        _assert_same(ref[BASE_OUTPUTS_KEY], base)
        inst, base_inst = ref["instances"], base["instances"]
        assert set(ref) == {"instances", BASE_OUTPUTS_KEY}
        assert inst.get_fields().keys() == base_inst.get_fields().keys()
        assert inst.pred_masks.dtype == torch.bool and inst.pred_masks.shape[1:] == (inp["height"], inp["width"])
        assert len(inst) == len(base_inst)  # no detection is lost to refinement
        # only the masks are refined: the other fields are the base instances'
        for k in ("pred_boxes", "scores", "pred_classes"):
            assert torch.equal(getattr(inst.get(k), "tensor", inst.get(k)),
                               getattr(base_inst.get(k), "tensor", base_inst.get(k)))
        changed += int(not torch.equal(inst.pred_masks, base_inst.pred_masks))
    assert changed

    # per-class mask AP on the instances GT, and class-agnostic entity AP on the entity GT, both sides
    thing_ids = {c["id"] for c in json.loads(Path(data["instances_json"]).read_text())["categories"]}
    for dataset, agnostic in ((name, False), (data["names"]["entity"], True)):
        cfg_ds = _cfg("MaskRCNN-R50-CRM.yaml", opts + ["MODEL.CRM.WEIGHTS", crm_weights,
                                                        "DATASETS.TEST", f"('{dataset}',)"])
        out = tmp_path / dataset
        evaluator = build_crm_evaluator(cfg_ds, dataset, str(out))
        assert evaluator._crm._class_agnostic is agnostic
        with return_base_outputs(on):
            results = inference_on_dataset(on, build_detection_test_loader(cfg_ds, dataset), evaluator)
        assert set(results) == {"base/segm", "crm/segm"}
        assert set(results["crm/segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        for side in ("base", "crm"):
            kept = json.loads((out / side / "instances_results.json").read_text())
            assert len(kept) == sum(len(b["instances"]) for _, b in base_runs)
            assert {r["category_id"] for r in kept} <= ({1} if agnostic else thing_ids)
        per_category = json.loads((out / "crm_comparison.json").read_text())["per_category"]
        if agnostic:
            assert list(per_category) == ["small", "medium", "large"]
        else:
            names = {c["id"]: c["name"] for c in json.loads(Path(data["instances_json"]).read_text())["categories"]}
            assert set(per_category) == set(names.values())
        assert all(set(r["crm"]) == {"AP", "AP50", "AP75"} for r in per_category.values())


def test_training_forward_is_the_base_model(data, crm_weights):
    """In training the wrapper is the base model: same losses, CRM never called, no CRM parameters."""
    name = data["names"]["instances"]
    opts = TINY + ["DATASETS.TEST", f"('{name}',)", "MODEL.CRM.WEIGHTS", crm_weights, "INPUT.MIN_SIZE_TRAIN",
                   "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MASK_FORMAT", "bitmask"]
    plain, _, on = _models("MaskRCNN-R50-CRM.yaml", opts, crm_weights, "GeneralizedRCNN")
    cfg = _cfg("MaskRCNN-R50-CRM.yaml", opts)
    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(name)[:2]]

    class Boom:
        def __getattr__(self, item):
            raise AssertionError("CRM used in training")

    object.__setattr__(on, "crm_refiner", Boom())
    losses = []
    for model in (plain, on):
        model.train()
        torch.manual_seed(1)
        with EventStorage():
            losses.append({k: v.item() for k, v in model(batch).items()})
    assert losses[0] == losses[1]
    assert {n for n, _ in on.named_parameters()} == {n for n, _ in plain.named_parameters()}


def test_config_errors(crm_weights):
    cfg = get_crm_cfg(str(CONFIGS / "PanopticFPN-R50-CRM.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "CRMPostRefiner" and cfg.MODEL.CRM.BASE_META_ARCHITECTURE == "PanopticFPN"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80 and cfg.MODEL.RESNETS.DEPTH == 50  # model zoo base applied
    with pytest.raises(ValueError, match="MODEL.CRM.WEIGHTS"):
        build_model(_cfg("MaskRCNN-R50-CRM.yaml", TINY))
    with pytest.raises(ValueError, match="MODEL.CRM.REFINE"):
        build_model(_cfg("MaskRCNN-R50-CRM.yaml", TINY + ["MODEL.CRM.WEIGHTS", crm_weights,
                                                          "MODEL.CRM.REFINE", "['masks']"]))
    with pytest.raises(KeyError, match="NoSuchArch"):
        build_model(_cfg("MaskRCNN-R50-CRM.yaml", TINY + ["MODEL.CRM.BASE_META_ARCHITECTURE", "NoSuchArch"]))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_crm_cfg("nope.yaml")
    for config, package in (("PanopticFCN-R50-CRM.yaml", "panopticfcn"), ("EntitySeg-R50-CRM.yaml", "entityseg")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(ImportError, match=package):
                get_crm_cfg(str(CONFIGS / config))
        else:
            assert get_crm_cfg(str(CONFIGS / config)).MODEL.CRM.BASE_META_ARCHITECTURE


def _option(name, text):
    from crm_d2.grabcut import GrabCut
    from crm_d2.guided import EdgeSnap
    from crm_d2.schedule import Rounds

    return {"edge_snap": EdgeSnap, "rounds": Rounds, "grabcut": GrabCut}[name].parse(text)


@pytest.mark.parametrize("name,key,value,file_own,bad", [
    ("edge_snap", "MODEL.CRM.EDGE_SNAP", "1:1:0.01", False, "wide"),
    ("rounds", "MODEL.CRM.ROUNDS", "3:0.3", "1", "many"),
    ("grabcut", "MODEL.CRM.GRABCUT", "2:1:0.25", False, "wide"),
])
def test_option_keys_mean_what_the_refiner_options_mean(crm_weights, name, key, value, file_own, bad):
    base = TINY + ["MODEL.CRM.WEIGHTS", crm_weights]
    own = getattr(build_model(_cfg("MaskRCNN-R50-CRM.yaml", base)).crm_refiner, name)
    assert own == (_option(name, file_own) if file_own else False)  # "": the file's own (it has none)
    model = build_model(_cfg("MaskRCNN-R50-CRM.yaml", base + [key, value]))
    assert getattr(model.crm_refiner, name) == _option(name, value)
    with pytest.raises(ValueError, match=name.replace("_", " ")):
        build_model(_cfg("MaskRCNN-R50-CRM.yaml", base + [key, bad]))


def _train_net(args, out, data, timeout=600):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
           str(CONFIGS / "PanopticFPN-R50-CRM.yaml"), "--eval-only", *args, "OUTPUT_DIR", str(out)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(data["root"]), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _panoptic_outputs(folder):
    """{image_id: (ids, segments_info)} of a COCO panoptic predictions.json and its PNG folder."""
    pred = load_panoptic(str(folder / "predictions.json"))
    return {i: (pred.read_ids(a), a["segments_info"]) for i, a in pred.annotations.items()}


def _assert_same_panoptic(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert np.array_equal(a[i][0], b[i][0]), i
        assert a[i][1] == b[i][1], i


def test_train_net_eval_only_cli_one_and_two_processes(data, crm_weights, tmp_path):
    """The README's command, on the generated dataset under the real dataset name, prints the table; with
    `--num-gpus 2` (two CPU processes, gloo) the outputs and numbers are those of one process."""
    # Base weights from a file: with MODEL.WEIGHTS "" every process (and every run) would draw its own.
    torch.manual_seed(0)
    base = tmp_path / "base_model.pth"
    torch.save({"model": build_model(_cfg("PanopticFPN-R50-CRM.yaml", PANOPTIC_TINY + ["MODEL.CRM.ENABLED",
                                                                                      "False"])).state_dict()}, base)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        proc = _train_net(["--num-gpus", str(n), *PANOPTIC_TINY, "MODEL.WEIGHTS", str(base),
                           "MODEL.CRM.WEIGHTS", crm_weights, "MODEL.CRM.REPORT", "True"], out, data)
        assert "without CRM" in proc.stdout and "panoptic_seg/PQ" in proc.stdout
        inference = out / "inference" / "coco_2017_val_panoptic_crm"
        for side in ("base", "crm"):
            assert len(load_panoptic(str(inference / side / "predictions.json")).annotations) == 3
        # the report, per dataset under OUTPUT_DIR: every picture it shows is there, a row per category
        parsed = parse_page(inference / "report" / "index.html")
        assert all((inference / "report" / src).is_file() for src in parsed.images)
        per_category = json.loads((inference / "crm_comparison.json").read_text())["per_category"]
        assert len(parsed.rows) == len(per_category) > 0
        runs[n] = inference
    assert (runs[2] / "crm_comparison.txt").read_text() == (runs[1] / "crm_comparison.txt").read_text()
    assert json.loads((runs[2] / "crm_comparison.json").read_text()) == \
        json.loads((runs[1] / "crm_comparison.json").read_text())
    for side in ("base", "crm"):
        _assert_same_panoptic(_panoptic_outputs(runs[1] / side), _panoptic_outputs(runs[2] / side))
    gallery = [json.loads((runs[n] / "report" / "report.json").read_text())["gallery"] for n in (1, 2)]
    assert sorted(map(json.dumps, gallery[0])) == sorted(map(json.dumps, gallery[1]))  # ties may swap places


def _readme_block(marker):
    """The bash block that follows `<!-- marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    assert f"<!-- {marker} -->" in text, f"README.md has no <!-- {marker} --> block"
    return text.split(f"<!-- {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0]


def test_readme_offline_command_runs(tmp_path):
    """The README's "try it without COCO" commands, as written (random base weights, no download), in a
    scratch folder instead of /tmp/tiny: they run, print the table and write refined segments."""
    block = _readme_block("d2-offline")
    assert "/tmp/tiny" in block and "MODEL.WEIGHTS" in block and "SEED 0" in block
    root = tmp_path / "tiny"
    # `python` in the block is this interpreter (the one that has detectron2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-ec", block.replace("/tmp/tiny", str(root))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "without CRM" in proc.stdout and "panoptic_seg/PQ" in proc.stdout
    inference = next(root.glob("**/inference/coco_2017_val_panoptic_crm"))
    base, crm = _panoptic_outputs(inference / "base"), _panoptic_outputs(inference / "crm")
    gt = json.loads((root / "coco" / "annotations" / "panoptic_val2017.json").read_text())
    assert crm.keys() == base.keys() == {a["image_id"] for a in gt["annotations"]}
    # random base weights, seeded by the README's SEED 0 (unseeded, this test failed now and then): segments on
    # every image
    assert all(len(segs) > 0 for _, segs in crm.values())
    assert any(not np.array_equal(base[i][0], crm[i][0]) for i in base)  # and CRM changed them


def test_crm_off_keeps_the_output_layout(data, crm_weights, tmp_path):
    """MODEL.CRM.ENABLED False: the same files, result keys and table as with CRM; the CRM side is the base's."""
    name = data["names"]["panoptic"]
    opts = PANOPTIC_TINY + ["DATASETS.TEST", f"('{name}',)", "MODEL.CRM.WEIGHTS", crm_weights]
    results, files = {}, {}
    for enabled in (True, False):
        cfg = _cfg("PanopticFPN-R50-CRM.yaml", opts + ["MODEL.CRM.ENABLED", str(enabled)])
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        out = tmp_path / f"enabled_{enabled}"
        with return_base_outputs(model):
            results[enabled] = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                                                    build_crm_evaluator(cfg, name, str(out)))
        files[enabled] = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert files[True] == files[False] and "crm_comparison.txt" in files[False]
    assert results[True].keys() == results[False].keys() == {"base/panoptic_seg", "crm/panoptic_seg"}
    assert results[False]["base/panoptic_seg"] == results[True]["base/panoptic_seg"]
    assert results[False]["crm/panoptic_seg"] == results[False]["base/panoptic_seg"]
    off = tmp_path / "enabled_False"
    _assert_same_panoptic(_panoptic_outputs(off / "base"), _panoptic_outputs(off / "crm"))
    assert json.loads((off / "crm_comparison.json").read_text())["crm_enabled"] is False


def test_train_net_and_crm_d2_panoptic_refine_the_same_way_by_default(data, tmp_path):
    """Same base predictions, every CRM setting left to its default in both: identical refined maps and PQ."""
    from crm_d2.cli import main as crm_d2_cli

    name = data["names"]["panoptic"]
    no_crm_overrides = [v for i in range(0, len(PANOPTIC_TINY), 2) if not PANOPTIC_TINY[i].startswith("MODEL.CRM.")
                        for v in PANOPTIC_TINY[i:i + 2]]
    cfg = _cfg("PanopticFPN-R50-CRM.yaml", no_crm_overrides + ["DATASETS.TEST", f"('{name}',)",
                                                                "MODEL.CRM.WEIGHTS", "demo"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    d2_out = tmp_path / "d2"
    with return_base_outputs(model):
        results = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                                       build_crm_evaluator(cfg, name, str(d2_out)))
    cli_out = tmp_path / "cli"
    assert crm_d2_cli(["panoptic", "--images", data["image_root"], "--weights", "demo",
                       "--pred-json", str(d2_out / "base" / "predictions.json"),
                       "--pred-dir", str(d2_out / "base" / "predictions"),
                       "--gt-json", data["panoptic_json"], "--gt-dir", data["panoptic_root"],
                       "-o", str(cli_out)]) == 0
    d2 = _panoptic_outputs(d2_out / "crm")
    cli = load_panoptic(str(cli_out / "panoptic.json"))
    cli = {i: (cli.read_ids(a), a["segments_info"]) for i, a in cli.annotations.items()}
    assert d2.keys() == cli.keys()
    for i in d2:
        assert np.array_equal(d2[i][0], cli[i][0]), i
        assert [(s["id"], s["category_id"]) for s in d2[i][1]] == [(s["id"], s["category_id"]) for s in cli[i][1]]
    base = _panoptic_outputs(d2_out / "base")
    assert any(not np.array_equal(base[i][0], d2[i][0]) for i in base)  # refinement did something
    pq = json.loads((cli_out / "pq.json").read_text())
    assert pq["with_crm"]["all"]["pq"] == pytest.approx(results["crm/panoptic_seg"]["PQ"], abs=1e-9)
    assert pq["without_crm"]["all"]["pq"] == pytest.approx(results["base/panoptic_seg"]["PQ"], abs=1e-9)


class _EmptyRefiner:
    """Refines every mask to nothing."""

    def refine_batch(self, image, masks, **kwargs):
        return np.zeros(np.asarray(masks).shape, np.float32)


def test_drop_empty_decides_whether_emptied_detections_stay(data, crm_weights):
    name = data["names"]["instances"]
    # BAND 0: with a band the coarse mask would hold away from the boundary and nothing would come out empty
    opts = TINY + ["DATASETS.TEST", f"('{name}',)", "MODEL.CRM.WEIGHTS", crm_weights, "MODEL.CRM.MIN_AREA", "1",
                   "MODEL.CRM.BAND", "0.0"]
    counts = {}
    for drop in (False, True):
        cfg = _cfg("MaskRCNN-R50-CRM.yaml", opts + ["MODEL.CRM.DROP_EMPTY", str(drop)])
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        object.__setattr__(model, "crm_refiner", _EmptyRefiner())
        runs = _run(model, build_detection_test_loader(cfg, name))
        counts[drop] = [(len(out["instances"]), len(out[BASE_OUTPUTS_KEY]["instances"])) for _, out in runs]
        if not drop:
            for _, out in runs:  # kept with their base masks
                assert torch.equal(_masks(out["instances"]), _masks(out[BASE_OUTPUTS_KEY]["instances"]))
    assert all(n == nb for n, nb in counts[False]) and sum(nb for _, nb in counts[False]) > 0
    assert all(n == 0 for n, _ in counts[True])


def test_no_detections(data, crm_weights, tmp_path):
    """An image set with no instances at all: nothing to refine, AP 0 on both sides, no crash."""
    name = data["names"]["instances"]
    cfg = _cfg("MaskRCNN-R50-CRM.yaml", TINY + ["DATASETS.TEST", f"('{name}',)", "MODEL.CRM.WEIGHTS", crm_weights,
                                                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.01"])
    model = build_model(cfg).eval()
    with return_base_outputs(model):
        results = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                                       build_crm_evaluator(cfg, name, str(tmp_path)))
    assert results["base/segm"]["AP"] == results["crm/segm"]["AP"] == 0.0

"""RaVL discovery: gap / influence / ranking math on hand-built inputs, the pipeline end to end with a
tiny random open_clip model on a tiny quadrant-digit set, the report, and the bridge to banks.

    .venv/bin/pytest -q tests/trainer/test_discover.py
"""

from __future__ import annotations

import functools
import json
import operator

import numpy as np
import open_clip
import pytest
import torch
from rich.console import Console

from bench.ravl_data import (
    CLASSNAMES,
    cramers_v,
    quadrant_samples,
    read_regions,
    rectangle_regions,
    write_quadrant_split,
)
from trainer.ravl.discover import (
    ClassGap,
    DiscoverConfig,
    assign_dataset,
    assign_regions,
    cluster_regions,
    discover,
    discover_from_arrays,
    feature_images,
    influence_score,
    kmedoids_pp_init,
    load_report,
    performance_gaps,
    precision_at_k,
    read_rows,
    save_report,
    spurious_mask,
)
from trainer.ravl.regions import region_embeddings
from trainer.ravl.report import (
    contact_sheet,
    name_features,
    print_report,
    propose_features,
    propose_to_bank,
)

# --- step 5: gaps and influence by hand -----------------------------------------------------


def test_performance_gaps_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    preds = np.array([0, 0, 1, 0, 0, 1, 1, 2])
    in_cluster = np.array([1, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    gaps = {g.label: g for g in performance_gaps(in_cluster, labels, preds, 3)}
    assert set(gaps) == {0, 1}  # class 2 has images only inside the cluster
    g0 = gaps[0]  # in: 2 images, both right; out: 2 images, one right
    assert (g0.n_in, g0.acc_in, g0.n_out, g0.acc_out) == (2, 1.0, 2, 0.5)
    assert g0.weight == 1.0 and g0.gap == pytest.approx(0.5)
    g1 = gaps[1]  # in: 1 image, wrong; out: 2 images, right; w = 2·1/3
    assert g1.weight == pytest.approx(2 / 3) and g1.gap == pytest.approx(-2 / 3)


def test_influence_score_by_hand():
    # images 0-3; regions (image): 0,0 | 1,1 | 2 | 3,3 ; cluster = regions {1, 3, 6}
    region_image = np.array([0, 0, 1, 1, 2, 3, 3])
    in_cluster = np.array([0, 1, 0, 1, 1, 0, 1], dtype=bool)
    labels = np.array([1, 1, 1, 0])
    preds = np.array([0, 0, 0, 1])  # all wrong
    region_probs = np.array(
        [
            [0.1, 0.9],  # image 0: the cluster region (1) scores highest for predicted class 0
            [0.8, 0.2],
            [0.7, 0.3],  # image 1: the other region scores highest for class 0
            [0.6, 0.4],
            [0.9, 0.1],  # image 2: a single region, skipped
            [0.5, 0.5],  # image 3: class 0 has a positive gap here, so it is not judged
            [0.1, 0.9],
        ]
    )
    gaps = [
        ClassGap(label=1, n_in=3, acc_in=0.0, n_out=1, acc_out=1.0, weight=0.5, gap=-0.5),
        ClassGap(label=0, n_in=1, acc_in=0.0, n_out=0, acc_out=0.0, weight=0.0, gap=0.1),
    ]
    score, by_class = influence_score(in_cluster, region_image, labels, preds, region_probs, gaps)
    assert by_class == {1: 0.5} and score == 0.5
    no_negative = [g.model_copy(update={"gap": 0.3}) for g in gaps]
    assert influence_score(in_cluster, region_image, labels, preds, region_probs, no_negative) == (None, {})


# --- steps 3-6 on a planted spurious feature ------------------------------------------------

C = 3
EMPTY, RECT = C, C + 1


def planted(seed=0, n=90, correlated=True, D=24):
    """Images of 4 regions (its digit, a rectangle half of the time, empties), embeddings = type prototype
    + noise. With `correlated`, the 'model' calls rectangle images class 0 (80 %) and misses class 0 without
    one (50 %); the rectangle region scores highest for class 0."""
    rng = np.random.default_rng(seed)
    protos = np.linalg.qr(rng.normal(size=(D, D)))[0][: C + 2]
    emb, region_image, types, labels, preds = [], [], [], [], []
    for i in range(n):
        y = i % C
        rect = bool(rng.random() < 0.5)
        kinds = [y, RECT if rect else EMPTY, EMPTY, EMPTY]
        rng.shuffle(kinds)
        for t in kinds:
            emb.append(protos[t] + 0.3 * rng.normal(size=D) / np.sqrt(D))
            region_image.append(i)
            types.append(t)
        p = y
        if correlated and rect and y != 0 and rng.random() < 0.8:
            p = 0
        elif correlated and not rect and y == 0 and rng.random() < 0.5:
            p = 1
        labels.append(y)
        preds.append(p)
    types = np.array(types)
    region_probs = np.full((len(types), C), 1.0 / C) + rng.uniform(0, 0.02, (len(types), C))
    for r, t in enumerate(types):
        if t < C:
            region_probs[r] = 0.1
            region_probs[r, t] = 0.8
        elif t == RECT:
            region_probs[r] = [0.9, 0.05, 0.05] if correlated else 1.0 / C
    image_probs = np.full((n, C), 0.1)
    image_probs[np.arange(n), preds] = 0.8
    return np.array(emb), np.array(region_image), np.array(labels), image_probs, region_probs, types


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_cluster_is_found_and_ranked_first(seed):
    emb, img, labels, iprobs, rprobs, types = planted(seed)
    paths = [f"image-{i}" for i in range(len(labels))]
    boxes = [(float(r), 0.0, float(r) + 1, 1.0) for r in range(len(types))]  # one distinct box per region
    cfg = DiscoverConfig(seed=seed, n_cpu=1)
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], cfg, paths, boxes)
    assert report.features, "the rectangle cluster must be discovered"
    top = report.features[0]
    assert all(types[r] == RECT for r in top.region_ids)
    assert top.influence == 1.0
    stats = next(s for s in report.clusters if s.cluster == top.cluster)
    gap = {g.label: g.gap for g in stats.gaps}
    assert gap[0] > 0 and gap[1] < 0 and gap[2] < 0
    gt = {(paths[img[r]], boxes[r]) for r in range(len(types)) if types[r] == RECT}
    assert precision_at_k(report, gt, k=10) == 1.0
    assert precision_at_k(report, lambda p, b: (p, b) in gt, k=10) == 1.0  # a predicate as ground truth
    assert precision_at_k(report, lambda p, b: False, k=10) == 0.0
    # the gap score orders the kept clusters, and every kept cluster passes the filter
    scores = [f.gap_score for f in report.features]
    assert scores == sorted(scores, reverse=True)
    assert all(f.influence >= 0.25 for f in report.features)
    # regions within the feature: most similar to the medoid first, the medoid itself leading
    f = report.features[0]
    medoid = next(s.medoid for s in report.clusters if s.cluster == f.cluster)
    assert f.region_ids[0] == medoid


def test_no_learned_correlation_no_feature():
    emb, img, labels, iprobs, rprobs, _ = planted(correlated=False)
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1))
    assert report.image_accuracy == 1.0 and report.features == []
    assert precision_at_k(report, set(), k=10) == 0.0


def test_cluster_regions_picks_k_by_silhouette_and_subsamples():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:4]
    x = np.repeat(centres, 50, axis=0) + 0.05 * rng.normal(size=(200, 16))
    labels, medoids, k, sil = cluster_regions(x, range(2, 8), seed=0, n_cpu=1)
    assert k == 4 and max(sil, key=sil.get) == 4 and len(medoids) == 4
    truth = np.repeat(np.arange(4), 50)
    assert all(len(set(labels[truth == t])) == 1 for t in range(4))
    labels2, _medoids2, k2, _ = cluster_regions(x, range(2, 8), seed=0, max_regions=60, n_cpu=1)
    assert k2 == 4 and len(labels2) == 200
    assert all(len(set(labels2[truth == t])) == 1 for t in range(4))


def _four_blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(16, 16)))[0][:4]
    return np.repeat(centres, 50, axis=0) + 0.05 * rng.normal(size=(200, 16)), np.repeat(np.arange(4), 50)


def test_kmedoids_pp_init_is_seeded_distinct_and_spread():
    x, truth = _four_blobs()
    diss = np.clip(1.0 - x @ x.T, 0.0, None)
    a, b = kmedoids_pp_init(diss, 4, seed=0), kmedoids_pp_init(diss, 4, seed=0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 4
    assert sorted(truth[a].tolist()) == [0, 1, 2, 3]  # D² seeding puts one medoid in each blob
    assert not np.array_equal(kmedoids_pp_init(diss, 4, seed=1), a)
    many = kmedoids_pp_init(diss, 150, seed=0)  # more medoids than blobs: still distinct
    assert len(set(many.tolist())) == 150


def test_alternate_clustering_is_the_references_option():
    """RaVL's clustering (alternating k-medoids from k-medoids++, seed 0) beside FasterPAM: same blobs,
    same k by silhouette; the report records which one made it."""
    x, truth = _four_blobs()
    labels, medoids, k, sil = cluster_regions(x, range(2, 8), seed=0, n_cpu=1, method="alternate")
    assert k == 4 and len(medoids) == 4
    assert all(len(set(labels[truth == t])) == 1 for t in range(4))
    again = cluster_regions(x, range(2, 8), seed=0, n_cpu=1, method="alternate")
    assert np.array_equal(again[0], labels) and again[3] == sil
    with pytest.raises(ValueError, match="clustering"):
        cluster_regions(x, range(2, 8), method="pam")
    emb, img, y, iprobs, rprobs, types = planted(0)
    cfg = DiscoverConfig(n_cpu=1, clustering="alternate")
    report = discover_from_arrays(emb, img, y, iprobs, rprobs, ["a", "b", "c"], cfg)
    assert report.config.clustering == "alternate" and report.features
    assert all(types[r] == RECT for r in report.features[0].region_ids)


def test_report_roundtrip_and_region_assignment(tmp_path):
    emb, img, labels, iprobs, rprobs, types = planted(seed=1)
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1))
    path = save_report(report, tmp_path / "report.json")
    again = load_report(path)
    assert again == report
    assert json.loads(path.read_text())["features"][0]["region_ids"] == report.features[0].region_ids
    # the medoids alone reproduce every region's cluster
    assert assign_regions(again, torch.tensor(emb)).tolist() == [r.cluster for r in report.regions]
    mask = spurious_mask(again, emb, top=1)
    assert mask.dtype == torch.bool and set(np.asarray(types)[mask.numpy()]) == {RECT}
    groups = feature_images(again)
    assert groups == [bool((mask.numpy() & (img == i)).any()) for i in range(len(labels))]
    data = json.loads(path.read_text())
    data["version"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        load_report(tmp_path / "bad.json")


# --- the controlled quadrant setting --------------------------------------------------------


def test_quadrant_samples_are_deterministic_and_follow_strength():
    a = quadrant_samples(200, spurious_class=3, strength=0.8, seed=5)
    b = quadrant_samples(200, spurious_class=3, strength=0.8, seed=5)
    assert all(np.array_equal(x.image, y.image) and x.label == y.label for x, y in zip(a, b))
    table = np.zeros((10, 2), dtype=int)
    for s in a:
        table[s.label, int(s.rect)] += 1
        assert s.rect_quadrant != s.digit_quadrant
        assert s.image.shape == (32, 32, 3)
        if s.rect:  # the rectangle quadrant is pure red
            x0, y0 = (s.rect_quadrant % 2) * 16, (s.rect_quadrant // 2) * 16
            assert (s.image[y0 : y0 + 16, x0 : x0 + 16] == [255, 0, 0]).all()
    assert table.sum(1).tolist() == [20] * 10
    assert table[3, 1] == 18 and all(table[y, 1] == 2 for y in range(10) if y != 3)  # (1 ± 0.8)/2 of 20
    assert cramers_v(table) > 0.6
    indep = quadrant_samples(200, seed=5)
    assert sum(s.rect for s in indep) == 100


def test_write_quadrant_split_files(tmp_path):
    csv_path = write_quadrant_split(tmp_path, "ft", 20, spurious_class=1, strength=1.0, seed=0)
    rows = read_rows(csv_path, CLASSNAMES)
    assert len(rows) == 20 and all((tmp_path / "images").exists() for _ in rows)
    meta = json.loads((tmp_path / "ft_meta.json").read_text())
    assert meta["cramers_v"] == 1.0 and meta["groups"]["one/rect"] == 2
    regions = read_regions(tmp_path / "ft_regions.csv")
    assert len(regions) == 80 and len(rectangle_regions(tmp_path / "ft_regions.csv")) == 2
    again = write_quadrant_split(tmp_path / "b", "ft", 20, spurious_class=1, strength=1.0, seed=0)
    assert again.read_text() == csv_path.read_text()
    assert (tmp_path / "b/images/ft_000007.png").read_bytes() == (
        tmp_path / "images/ft_000007.png"
    ).read_bytes()


# --- end to end with a tiny random open_clip model -----------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.CLIP(**cfg).eval()
    return model, open_clip.image_transform(32, is_train=False), open_clip.SimpleTokenizer(context_length=16)


@pytest.fixture(scope="module")
def quad_eval(tmp_path_factory):
    d = tmp_path_factory.mktemp("quad")
    return write_quadrant_split(d, "eval", 30, seed=0, pool="eval")


@pytest.mark.parametrize("mode", ["crop", "roi"])
def test_discover_end_to_end(tiny_clip, quad_eval, tmp_path, mode):
    model, preprocess, tokenizer = tiny_clip
    rows = read_rows(quad_eval, CLASSNAMES)
    cfg = DiscoverConfig(mode=mode, templates=("a photo of the number {c}.", "{c}"), n_cpu=1, batch_size=8)
    report = discover(model, preprocess, tokenizer, rows, CLASSNAMES, cfg)
    assert len(report.images) == 30 and len(report.regions) == 120
    assert 20 <= report.k < 50 and len(report.medoid_embeddings) == report.k
    assert {r.box for r in report.regions} == {
        (0, 0, 16, 16),
        (16, 0, 32, 16),
        (0, 16, 16, 32),
        (16, 16, 32, 32),
    }
    assert [im.path for im in report.images] == [p for p, _ in rows]
    for f in report.features:  # whatever a random model 'learned', a kept feature obeys the filter
        s = next(s for s in report.clusters if s.cluster == f.cluster)
        assert s.kept and s.influence >= 0.25
        assert any(g.gap > 0 for g in s.gaps) and any(g.gap < 0 for g in s.gaps)
    # the saved medoids assign freshly computed region embeddings to the clusters of the report
    loaded = load_report(save_report(report, tmp_path / "r.json"))
    clusters, spurious = assign_dataset(loaded, model, preprocess, rows[:4])
    assert functools.reduce(operator.iadd, clusters, []) == [r.cluster for r in report.regions[:16]]
    top = {f.cluster for f in report.features[:1]}
    assert spurious == [[c in top for c in cs] for cs in clusters]
    if mode == "roi":  # the tensor path the loss uses sees the same regions
        from PIL import Image

        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in rows[:4]])
        with torch.no_grad():
            e, _ = region_embeddings(model, x, grid=(2, 2), mode=mode)
        assert assign_regions(loaded, e).tolist() == [r.cluster for r in report.regions[:16]]
    # the quadrant boxes CSV gives the same regions as the 2x2 grid
    cfg_boxes = cfg.model_copy(update={"boxes_csv": str(quad_eval.with_name("eval_regions.csv"))})
    report_b = discover(
        model,
        preprocess,
        tokenizer,
        rows[:12],
        CLASSNAMES,
        cfg_boxes.model_copy(update={"k_min": 4, "k_max": 8}),
    )
    assert [r.box for r in report_b.regions] == [r.box for r in report.regions[:48]]
    # rendering
    console = Console(record=True, width=120)
    print_report(report, console)
    assert "images, 120 regions" in console.export_text()
    png = contact_sheet(report, tmp_path / "sheet.png", top=5)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_contact_sheet_and_tables_with_a_feature(tmp_path, quad_eval):
    """A report whose features point at real images: the sheet has one row per feature."""
    from PIL import Image

    rows = read_rows(quad_eval, CLASSNAMES)
    regions = read_regions(quad_eval.with_name("eval_regions.csv"))
    emb, img, labels, iprobs, rprobs, _types = planted(n=30)
    paths = [p for p, _ in rows]
    boxes = [b for _, b, _ in regions]
    report = discover_from_arrays(
        emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1), paths=paths, boxes=boxes
    )
    assert report.features
    console = Console(record=True, width=120)
    print_report(report, console)
    text = console.export_text()
    assert "Feature #1" in text and "acc with" in text
    out = contact_sheet(report, tmp_path / "s.png", top=4, features=2, thumb=32)
    with Image.open(out) as im:
        assert im.height == min(2, len(report.features)) * 36 + 4


# --- bridge to banks ------------------------------------------------------------------------


@pytest.fixture()
def bank_v1(tmp_path):
    from descgen.bank import BankDoc
    from descgen.schema import Concept, Descriptor

    doc = BankDoc.new()
    gid = doc.start_generation("test")
    doc.add_concept(Concept(name="background", form="suffix", sources=["catalog"], provenance=gid))
    doc.add_descriptors(
        "background",
        [Descriptor(id="background.on-grass", template="{caption} on grass", form="suffix", provenance=gid)],
    )
    doc.finish_generation(gid)
    banks = tmp_path / "banks"
    banks.mkdir()
    return doc.save(banks)


def test_propose_to_bank_writes_a_new_version(bank_v1):
    from descgen.bank import load_bank

    emb, img, labels, iprobs, rprobs, _ = planted()
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1))
    before = bank_v1.read_text()
    names = [[("with a red rectangle", 0.41), ("on grass", 0.2)]] + [[("on grass", 0.3)]] * (
        len(report.features) - 1
    )
    out = propose_to_bank(report, bank_v1, names, concept="background", report_path="r.json")
    assert out.name == "v2.yaml" and bank_v1.read_text() == before
    bank = load_bank(out)
    assert bank.meta.parent == 1
    d = next(d for d in bank.concept("background").descriptors if d.id == "background.with-a-red-rectangle")
    assert (
        d.source == "discovered" and d.status == "proposed" and d.template == "{caption} with a red rectangle"
    )
    assert d.evidence["feature_rank"] == 1 and d.evidence["influence"] == 1.0
    assert d.evidence["region_ids"] == report.features[0].region_ids[:10]
    assert set(d.evidence["gaps"]) == {"a", "b", "c"}
    assert d.provenance == bank.meta.generations[-1].id
    if len(report.features) > 1:  # a lower-ranked feature named by an existing phrase: evidence, no duplicate
        grass = next(d for d in bank.concept("background").descriptors if d.id == "background.on-grass")
        assert grass.evidence is not None and grass.source == "llm"
    # into a concept of its own, and the next free version
    out3 = propose_to_bank(report, out, [[("with a red square", 0.5)]], concept="discovered")
    bank3 = load_bank(out3)
    assert out3.name == "v3.yaml" and bank3.concept("discovered").sources == ["discovered"]
    assert [d.id for d in bank3.concept("discovered").descriptors] == ["discovered.with-a-red-square"]
    # a phrase already in the bank is not added twice: the evidence goes to the existing descriptor
    out4 = propose_to_bank(report, out3, [[("with a red rectangle", 0.5)]], concept="discovered")
    bank4 = load_bank(out4)
    assert [d.id for d in bank4.concept("discovered").descriptors] == ["discovered.with-a-red-square"]
    assert bank4.meta.generations[-1].stats == {
        "features": len(report.features),
        "added": 0,
        "matched_existing": 1,
    }


def test_name_features_ranks_phrases_by_medoid_similarity(tiny_clip):
    model, _, tokenizer = tiny_clip
    emb, img, labels, iprobs, rprobs, _ = planted()
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1))
    # put the model's own text embedding of one phrase as the top feature's medoid
    from trainer.ravl.regions import class_embeddings

    phrases = ["with a red rectangle", "on grass", "in the snow"]
    with torch.no_grad():
        t = class_embeddings(model, tokenizer, phrases, ("{c}", "a photo {c}."))
    medoids = [[0.0] * 32 for _ in report.medoid_embeddings]
    medoids[report.features[0].cluster] = t[2].tolist()
    report = report.model_copy(update={"medoid_embeddings": medoids})
    names = name_features(report, model, tokenizer, phrases, top=2)
    assert len(names) == len(report.features)
    assert names[0][0][0] == "in the snow" and names[0][0][1] == pytest.approx(1.0, abs=1e-4)
    assert len(names[0]) == 2 and names[0][0][1] >= names[0][1][1]


def test_to_bank_names_and_writes(tiny_clip, bank_v1):
    from descgen.bank import load_bank

    model, _, tokenizer = tiny_clip
    emb, img, labels, iprobs, rprobs, _ = planted()
    report = discover_from_arrays(emb, img, labels, iprobs, rprobs, ["a", "b", "c"], DiscoverConfig(n_cpu=1))
    report = report.model_copy(update={"medoid_embeddings": torch.randn(report.k, 32).tolist()})
    out = propose_features(report, bank_v1, model, tokenizer, ["with a red rectangle", "with a blue circle"])
    bank = load_bank(out)
    stats = bank.meta.generations[-1].stats
    assert out.name == "v2.yaml" and stats["added"] + stats["matched_existing"] == len(report.features)

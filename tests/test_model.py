import pytest
import torch
import torch.nn.functional as F

import crm_d2.cpu as crm_cpu
import crm_d2.model as crm_model
from crm_d2.model import TRUNK_BYTES_PER_PX_PER_WIDTH, CRM, CRMConfig, axis_neighbours, count_parameters, make_coord


def test_released_parameter_count_and_layout():
    model = CRM()
    assert count_parameters(model) == 9_300_961
    state = model.state_dict()
    assert state["feats.conv1.weight"].shape == (64, 4, 7, 7)
    assert state["aspp_.aspp1_128.atrous_conv.weight"].shape == (64, 64, 1, 1)
    assert state["aspp_.aspp1_256.atrous_conv.weight"].shape == (64, 256, 1, 1)
    assert state["aspp_.aspp1_1024.atrous_conv.weight"].shape == (128, 1024, 1, 1)
    assert state["aspp_.last_conv.0.weight"].shape == (256, 256, 3, 3)
    assert state["imnet.layers.0.weight"].shape == (32, 262)
    assert state["imnet.layers.8.weight"].shape == (1, 32)
    assert not any(k.startswith("feats.layer4") for k in state)
    # layer3 is dilated after its first block, as released
    assert model.feats.layer3[0].conv2.dilation == (1, 1)
    assert model.feats.layer3[1].conv2.dilation == (2, 2)
    assert model.feats.layer2[0].conv2.stride == (2, 2)
    assert model.feats.layer2[0].downsample[0].stride == (2, 2)


def test_feature_map_is_stride_two(device):
    model = CRM(CRMConfig.preset("tiny")).eval().to(device)
    with torch.no_grad():
        feat = model.encode(torch.randn(1, 4, 37, 50, device=device))
    assert feat.shape == (1, 128, 19, 25)


def test_config_round_trip_and_errors():
    cfg = CRMConfig.preset("tiny")
    assert CRMConfig.from_dict(cfg.to_dict()) == cfg
    assert CRMConfig.from_dict({"preset": "tiny", "hidden": 16}).hidden == 16
    assert CRMConfig.from_dict({"preset": None, "width": 8}) == CRMConfig(width=8)
    with pytest.raises(ValueError, match="unknown CRM preset"):
        CRMConfig.preset("r101")
    with pytest.raises(ValueError, match="unknown CRM preset 'r51'"):
        CRMConfig.from_dict({"preset": "r51"})
    with pytest.raises(ValueError, match="unknown CRM config keys"):
        CRMConfig.from_dict({"widht": 3})


def test_axis_neighbours_hand_checked():
    # 4 query centres (-.75, -.25, .25, .75) over 2 feature cells (centres -.5, .5)
    q = make_coord(4)
    assert torch.allclose(q, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    idx, rel = axis_neighbours(q, 2)
    assert idx.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]
    assert torch.allclose(rel, torch.tensor([[-0.5, 0.5, 1.5, 0.5], [-0.5, -1.5, -0.5, 0.5]]))


def _identity_decoder(model):
    """MLP that returns feature channel 0 (positive features pass every ReLU unchanged)."""
    with torch.no_grad():
        for layer in model.imnet.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
                layer.weight[0, 0] = 1.0
    return model


def test_local_ensemble_is_bilinear_interpolation_of_the_logits():
    # With an MLP that reads only the feature, LIIF's opposite-area blend is bilinear interpolation of the
    # feature between cell centres (align_corners=False); that pins the neighbour choice and the weights.
    model = _identity_decoder(CRM(CRMConfig.preset("tiny")))
    feat = torch.rand(1, 128, 5, 7) + 0.1
    proj = model.project(feat)
    out = model.decode_rows(proj, (20, 28), (0, 20))
    expect = F.interpolate(feat[:, :1], size=(20, 28), mode="bilinear", align_corners=False)[:, 0]
    # interior queries (the release clamps differently from F.interpolate at the outer half cell)
    assert torch.allclose(out[:, 2:-2, 2:-2], expect[:, 2:-2, 2:-2], atol=1e-5)


@torch.no_grad()  # inference: on CUDA the fused Triton decoder
def test_decode_rows_chunks_equal_whole(device, tol):
    model = CRM(CRMConfig.preset("tiny")).eval().to(device)
    proj = model.project(torch.randn(2, 128, 6, 9, device=device))
    whole = model.decode_rows(proj, (23, 31), (0, 23))
    parts = torch.cat([model.decode_rows(proj, (23, 31), (r, min(23, r + 5))) for r in range(0, 23, 5)], 1)
    cols = model.decode_rows(proj, (23, 31), (4, 9), cols=(3, 17))
    atol = tol(1e-6, whole.abs().max())
    assert torch.allclose(whole, parts, atol=atol)
    assert torch.allclose(whole[:, 4:9, 3:17], cols, atol=atol)


@torch.no_grad()
def test_factored_decoder_matches_released_decoding(tiny_model, device):
    from crm_d2.reference import make_coord_grid, query_logits

    tiny_model.to(device)
    feat = torch.randn(1, 128, 6, 9).to(device)
    H, W = 17, 26
    coord = make_coord_grid((H, W), device)[None]
    cell = torch.empty_like(coord)
    cell[..., 0], cell[..., 1] = 2 / H, 2 / W
    ref = query_logits(tiny_model, feat, coord, cell).view(1, H, W)
    ours = tiny_model.decode_rows(tiny_model.project(feat), (H, W), (0, H))
    assert ref.std() > 0.1
    assert torch.allclose(ours, ref, atol=1e-4)


def _cpu_decoder_cases(model, H, W):
    """CPU_BLOCK_BYTES values for `_ensemble_cpu`: the default (one block), blocks of 3 query rows (the last one
    shorter), and blocks of one row run through the MLP in 3 slices."""
    K, row = model.cfg.hidden, 4 * W  # MLP rows per query row
    return {"default": crm_model.CPU_BLOCK_BYTES, "3 rows": 3 * row * 4 * K, "slices": (row // 3 + 1) * 4 * K}


@pytest.mark.parametrize("fused", [True, False], ids=["onednn", "fallback"])
@pytest.mark.parametrize("cfg", [{"preset": "small", "mask_skip": True}, {"preset": "tiny", "hidden": 16, "depth": 2}],
                         ids=["demo-like", "tiny-h16-d2"])
def test_cpu_decoder_equals_the_plain_reference(cfg, fused, randomize_model, monkeypatch):
    """CPU inference decodes through `_ensemble_cpu` (blocked, oneDNN's fused linear when it is there). It must
    give `_blend` of the MLP on the four neighbours (`decode_points` at every pixel) and the plain path's logits,
    whatever the blocking, for an MLP of any width and depth, with and without the fused op."""
    if fused and not crm_cpu.fused_linear_ok():
        pytest.skip("oneDNN's fused linear is not available in this torch build")
    if not fused:
        monkeypatch.setattr(crm_cpu, "fused_linear_ok", lambda: False)
    model = randomize_model(CRM(CRMConfig.from_dict(cfg)))
    calls = []
    real = CRM._ensemble_cpu
    monkeypatch.setattr(CRM, "_ensemble_cpu", lambda *a: calls.append(1) or real(*a))
    B, H, W = 2, 23, 31  # 3.3 queries per feature cell: uneven neighbour runs
    with torch.no_grad():
        proj = model.project(torch.randn(B, model.cfg.feat_dim, 7, 9))
        qy, qx = make_coord(H), make_coord(W)
        grid_y, grid_x = (t.reshape(1, -1).expand(B, -1) for t in torch.meshgrid(qy, qx, indexing="ij"))
        blend = model.decode_points(proj, grid_y, grid_x, (2 / H, 2 / W)).view(B, H, W)
        rows, cols = model.query_terms(proj, qy, qx, (2 / H, 2 / W))
        plain = model._ensemble_plain(proj, rows, cols)
        assert blend.std() > 1 and not calls
        for name, block_bytes in _cpu_decoder_cases(model, H, W).items():
            monkeypatch.setattr(crm_model, "CPU_BLOCK_BYTES", block_bytes)
            got = model.decode_rows(proj, (H, W), (0, H))
            atol = 1e-5 * float(blend.abs().max())
            torch.testing.assert_close(got, blend, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(got, plain, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
    assert len(calls) == 3  # the CPU path ran
    with torch.no_grad():  # a feature crop (tiled decoding): a non-contiguous proj
        part = model.decode(proj[:, 1:6, 1:8], qy[5:17], qx[8:26], (2 / H, 2 / W), feat_grid=(7, 9), offset=(1, 1))
    torch.testing.assert_close(part, blend[:, 5:17, 8:26], rtol=0, atol=1e-5 * float(blend.abs().max()))


def test_training_forward_has_gradients(device):
    model = CRM(CRMConfig.preset("tiny")).train().to(device)
    x = torch.randn(2, 4, 32, 32, device=device)
    logits = model(x)
    assert logits.shape == (2, 1, 32, 32)
    logits.mean().backward()
    assert model.feats.conv1.weight.grad is not None and model.imnet.layers[0].weight.grad.abs().sum() > 0


def test_slab_projected_encoding_equals_full(tiny_model, device):
    tiny_model.to(device)
    x = torch.randn(2, 4, 75, 61).to(device)
    with torch.no_grad():
        full = tiny_model.project(tiny_model.encode(x))
        slabs = tiny_model.encode_projected(x, budget=1)  # one feature row per slab
    assert torch.allclose(full, slabs, atol=1e-4 * float(full.abs().max()))


def test_fusion_on_two_cores_takes_one_row_range_each_and_equals_the_full_form(tiny_model, monkeypatch):
    """On the CPU a map of two slabs or more per core is fused as one row range per core (`per_core`), each range
    with its own `UpsampledConv`: the ranges meet without gaps or overlaps and the result equals the full form.
    After a row-tiled trunk the fusion stays serial (its slabs recompute the stem's rows)."""
    model = tiny_model.cpu().eval()
    x = torch.randn(1, 4, 75, 61)
    ranges = []
    real = crm_model.per_core
    monkeypatch.setattr(crm_model, "per_core", lambda fn, items: ranges.append(list(items)) or real(fn, ranges[-1]))
    slabs_of_4_rows = 31 * 4 * model.cfg.feat_dim * 4 * 3
    per_row = 61 * TRUNK_BYTES_PER_PX_PER_WIDTH * model.cfg.width
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            full = model.project(model.encode(x))
            rows = model.encode_projected(x, budget=slabs_of_4_rows)
            # After a tiled trunk the slabs recompute their stem rows: they stay serial, in one range.
            tiled = model.encode_projected(x, slabs_of_4_rows, trunk_budget=per_row * 24)
    finally:
        torch.set_num_threads(before)
    assert ranges == [[(0, 19), (19, 38)], [(0, 38)]]
    assert torch.allclose(full, rows, atol=1e-4 * float(full.abs().max()))
    assert torch.allclose(full, tiled, atol=1e-4 * float(full.abs().max()))


@torch.no_grad()  # inference: on CUDA the fused Triton decoder, with feature offsets as fast mode uses them
def test_decoding_a_feature_crop_equals_the_whole_map(tiny_model, device, tol):
    tiny_model.to(device)
    proj = tiny_model.project(torch.randn(1, 128, 10, 12).to(device))
    H, W = 40, 48
    whole = tiny_model.decode_rows(proj, (H, W), (0, H))
    # rows 12..28 / cols 8..32 only need feature rows 2..8 / cols 1..9 (plus one neighbour)
    crop = proj[:, 2:9, 1:10]
    part = tiny_model.decode(crop, make_coord(H, device)[12:28], make_coord(W, device)[8:32], cell=(2 / H, 2 / W),
                             feat_grid=(10, 12), offset=(2, 1))
    assert torch.allclose(part, whole[:, 12:28, 8:32], atol=tol(1e-6, whole.abs().max()))


def test_row_tiled_trunk_equals_whole(tiny_model, device, tol):
    tiny_model.to(device)
    x = torch.randn(2, 4, 300, 40).to(device)
    per_row = 2 * 40 * TRUNK_BYTES_PER_PX_PER_WIDTH * tiny_model.cfg.width
    with torch.no_grad():
        whole = tiny_model.encode_projected(x)
        halo = tiny_model.trunk_halo()
        # tiles of 8 and 40 own rows, each with the receptive-field halo; fused in slabs of 3 rows / all rows
        for rows, slab_budget in ((8, 200_000), (40, 256 << 20)):
            tiled = tiny_model.encode_projected(x, slab_budget, trunk_budget=per_row * (2 * halo + rows))
            assert torch.allclose(tiled, whole, atol=tol(1e-6, whole.abs().max()))
        # The halo is what makes it exact: with too little context the tiles' seams show.
        tiny_model.trunk_halo = lambda: 8
        seams = tiny_model.encode_projected(x, trunk_budget=per_row * 24)
    assert (seams - whole).abs().max() > 1e-4


@pytest.mark.parametrize("keep_stem", [False, True])
def test_a_row_tile_frees_the_stems_map_before_the_trunk_runs(tiny_model, monkeypatch, keep_stem):
    """A row tile's stem map is recomputed per fusion slab, so nothing may hold it while layer1-3 run: it is the
    tile's largest map (6000x4000 peaked 0.4 GB higher when it was held). Untiled, the fusion reads it."""
    import weakref

    model = tiny_model.cpu().eval()
    stems, alive_in_trunk = [], []
    make_stem, run_folded = model._stem, crm_model.run_folded

    def stem(x):
        y = make_stem(x)
        stems.append(weakref.ref(y))
        return y

    def trunk_layer(layer, x):
        alive_in_trunk.append(stems[-1]() is not None)
        return run_folded(layer, x)

    monkeypatch.setattr(model, "_stem", stem)
    monkeypatch.setattr(crm_model, "run_folded", trunk_layer)
    with torch.no_grad():
        kept, b2, b3 = model._branches(torch.randn(1, 4, 64, 48), keep_stem=keep_stem)
    assert alive_in_trunk == [keep_stem] * 3
    assert (kept is not None) == keep_stem and b2.shape[-2:] == (16, 12) and b3.shape[-2:] == (8, 6)


def test_trunk_halo_covers_the_receptive_field():
    # conv1 3 + pool 2 + layer1 3x4 + layer2 4+3x8 + layer3 8+5x16 = 133 px for the released ResNet-50
    assert CRM(CRMConfig()).trunk_halo() == 160
    assert CRM(CRMConfig.preset("tiny")).trunk_halo() == 64


def test_folded_batchnorm_equals_conv_then_bn_and_follows_weight_changes(tiny_model):
    """The encoder path folds each BN into its conv and caches the result: it must equal conv + BN, and a change
    of the model's weights (load_state_dict, in-place edits) must reach the next call, not a stale cache."""
    from crm_d2.model import bn_, conv_bn

    model = tiny_model.cpu().eval()
    block = model.feats.layer1[0]
    x = torch.randn(1, block.conv1.in_channels, 24, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for edit in (None, "running_var", "weight"):
            if edit == "running_var":
                block.bn1.running_var.mul_(1.7)
            elif edit == "weight":
                block.conv1.weight.add_(0.1)
            want = bn_(block.bn1, block.conv1(x.contiguous()))
            torch.testing.assert_close(conv_bn(block.conv1, block.bn1, x), want, atol=1e-5, rtol=1e-5)
        # and the whole folded trunk + fusion agrees with the module-by-module inference
        inp = torch.randn(1, 4, 64, 48)
        ref = model.project(model.encode(inp))
        torch.testing.assert_close(model.encode_projected(inp), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("low_hw,size", [((13, 11), (25, 21)), ((7, 9), (25, 33)), ((6, 5), (23, 20)), ((1, 4), (3, 13))])
def test_conv_of_upsampled_map_without_upsampling_equals_the_direct_conv(low_hw, size, monkeypatch):
    """The fusion conv's cheap form (`UpsampledConv`): 1x3 convs on the small map's rows and a row-interpolation
    product must equal conv3x3(F.interpolate(low)) with zero padding, whatever the ratio, the edges and the way
    the output is sliced into slabs (in order, out of order, one row at a time)."""
    from crm_d2.model import UpsampledConv

    g = torch.Generator().manual_seed(0)
    low = torch.randn(2, 5, *low_hw, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 5, 3, 3, generator=g)
    want = F.conv2d(F.interpolate(low, size=size, mode="bilinear", align_corners=True), weight, padding=1)
    H = size[0]
    whole, first_rows, one_by_one = [(0, H)], [(0, 1), (1, 2), (2, H)], [(r, r + 1) for r in range(H)]
    backwards = [(H // 2, H), (0, H // 2)]
    for product_rows in (8, 1000):  # the CPU's products of 8 output rows; one product per slab (GPUs)
        monkeypatch.setattr(crm_model, "Y_MATMUL_ROWS", product_rows)
        for slabs in (whole, first_rows, one_by_one, backwards):
            up = UpsampledConv(low, weight, size)
            got = torch.empty_like(want)
            for a, b in slabs:
                rows = torch.zeros(2, 6, b - a, size[1]).contiguous(memory_format=torch.channels_last)
                got[:, :, a:b] = up.add_rows(rows, a)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fusion_parts_sum_to_the_neck_on_the_encoders_path(tiny_model):
    """The real path: the neck's own folded fusion weights, split by `folded_fusion_parts`, the stride-2 part as a
    conv and the other two through `UpsampledConv` onto its output, equal the neck's conv over the concatenated,
    upsampled maps."""
    from crm_d2.model import UpsampledConv, folded_conv_bn

    model = tiny_model.cpu().eval()
    n, g = model.aspp_, torch.Generator().manual_seed(1)
    w = n.aspp1_128.atrous_conv.out_channels
    b1, b2, b3 = (torch.randn(1, c, h, wd, generator=g).contiguous(memory_format=torch.channels_last)
                  for c, h, wd in ((w, 20, 18), (w, 10, 9), (2 * w, 5, 5)))
    size = b1.shape[-2:]
    weight, bias = folded_conv_bn(n.last_conv[0], n.last_conv[1])
    up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
    with torch.no_grad():
        want = F.conv2d(torch.cat((b1, up(b2), up(b3)), 1), weight, bias, padding=1)
        w1, w2, w3, bias1 = n.folded_fusion_parts()
        got = F.conv2d(b1, w1, bias1, padding=1).contiguous(memory_format=torch.channels_last)
        UpsampledConv(b2, w2, size).add_rows(got, 0)
        UpsampledConv(b3, w3, size).add_rows(got, 0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_folded_blocks_reuse_their_buffers_and_leave_a_kept_input_alone(tiny_model):
    """`Bottleneck.folded` writes its output into the shortcut's buffer: with consume_input that is the input
    itself (what `run_folded` does for every block after the first); without it the input must be unchanged."""
    model = tiny_model.cpu().eval()
    block = model.feats.layer3[1]  # no downsample: the shortcut is the input
    x = torch.randn(1, block.conv1.in_channels, 12, 10).relu().contiguous(memory_format=torch.channels_last)
    kept = x.clone()
    with torch.no_grad():
        want = block._inference(x.contiguous())
        torch.testing.assert_close(block.folded(x), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(x, kept)
        out = block.folded(x, consume_input=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert out.data_ptr() == x.data_ptr()

"""`convray explain` against a real server and `convray kernels` on its own, as subprocesses."""

import numpy as np
import pytest
from PIL import Image

from convray.service.client_commands import KERNEL_NAMES
from convray.workers.kernels import KERNELS
from tests.conftest import REPO_ROOT
from tests.e2e.test_cli import free_port, run_cli

pytestmark = pytest.mark.e2e
DIGIT_3 = str(REPO_ROOT / "examples" / "digits" / "digit-3.png")


def test_explain_writes_a_png_per_block_and_per_class_and_says_so(served, tmp_path):
    out = tmp_path / "explained"
    result = run_cli("explain", DIGIT_3, "--out", str(out), "--server", served.address, "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{DIGIT_3}: digits v1")
    blocks = ["block0_conv", "block1_conv", "block2_pool", "block3_conv", "block4_pool", "block5_dropout"]
    assert {p.name for p in out.iterdir() if p.name.startswith("block")} == {f"{b}.png" for b in blocks}
    cams = sorted(p.name for p in out.iterdir() if p.name.startswith("cam-"))
    assert len(cams) == 2 and cams[0] == "cam-1-3.png" and cams[1].startswith("cam-2-")
    assert lines[1] == f"wrote {out / 'block0_conv.png'}  feature maps of block0_conv (32x8x8), 32 channels in 6x6"
    assert f"wrote {out / 'cam-1-3.png'}  CAM of class '3' (p=" in result.stdout
    for path in out.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG"
    assert len(lines) == 1 + len(blocks) + 2


def test_explain_with_blocks_and_grad_cam(served, tmp_path):
    result = run_cli("explain", DIGIT_3, "--out", str(tmp_path), "--server", served.address,
                     "--blocks", "block3_conv", "--top-k", "1", "--method", "grad-cam")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block3_conv.png", "cam-1-3.png"]
    assert "Grad-CAM of class '3'" in result.stdout


def test_explain_reports_an_unknown_block_with_exit_code_1(served, tmp_path):
    result = run_cli("explain", DIGIT_3, "--out", str(tmp_path), "--server", served.address, "--blocks", "conv9")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: unknown block(s) ['conv9']" in result.stderr and "valid blocks:" in result.stderr


def test_explain_says_clearly_when_no_server_is_there(tmp_path):
    result = run_cli("explain", DIGIT_3, "--out", str(tmp_path), "--server", f"127.0.0.1:{free_port()}",
                     "--connect-timeout", "1")  # fmt: skip
    assert result.returncode == 3 and "cannot reach a server" in result.stderr


def test_the_cli_offers_exactly_the_kernels_there_are():
    assert sorted(KERNEL_NAMES) == sorted(KERNELS)


def test_kernels_finds_the_vertical_edge_with_sobel_x(tmp_path):
    image = np.full((16, 20), 30, np.uint8)
    image[:, 10:] = 220
    source, target = tmp_path / "edge.png", tmp_path / "sobel.png"
    Image.fromarray(image).save(source)
    result = run_cli("kernels", str(source), "--kernel", "sobel-x", "--out", str(target), "--padding", "valid")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"wrote {target}  sobel-x (valid padding, stride 1): 20x16 -> 18x14, |response| scaled to its maximum"
    )
    response = np.asarray(Image.open(target))
    assert response.shape == (14, 18)
    assert (response[:, 8:10] == 255).all() and (response[:, :8] == 0).all() and (response[:, 10:] == 0).all()


def test_kernels_reads_a_16_bit_image_as_the_server_does(tmp_path):
    """Found in review: Pillow's convert("L") clips 16-bit values at 255, so the edge below vanished into white."""
    image = np.full((16, 20), 30 << 8, np.uint16)
    image[:, 10:] = 220 << 8
    source, target = tmp_path / "edge16.png", tmp_path / "sobel.png"
    Image.fromarray(image).save(source)
    result = run_cli("kernels", str(source), "--kernel", "sobel-x", "--out", str(target), "--padding", "valid")
    assert result.returncode == 0, result.stderr
    response = np.asarray(Image.open(target))
    assert (response[:, 8:10] == 255).all() and (response[:, :8] == 0).all() and (response[:, 10:] == 0).all()


def test_kernels_blurs_a_colour_image_with_padding_and_stride(tmp_path):
    source, target = tmp_path / "photo.png", tmp_path / "blurred.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 30, 3)).astype(np.uint8)).save(source)
    result = run_cli("kernels", str(source), "--kernel", "gaussian", "--out", str(target),
                     "--padding", "1", "--stride", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(target) as blurred:
        assert blurred.mode == "RGB" and blurred.size == (15, 11)


def test_kernels_refuses_bad_usage(tmp_path):
    result = run_cli("kernels", DIGIT_3, "--kernel", "sobel-x", "--out", str(tmp_path / "x.png"), "--padding", "wide")
    assert result.returncode == 2 and "--padding must be same, valid or a number" in result.stderr
    result = run_cli("kernels", str(tmp_path / "missing.png"), "--kernel", "sobel-x", "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1 and "cannot read as an image" in result.stderr
    # Found in review: out-of-range values printed pydantic's multi-line error with its links.
    result = run_cli("kernels", DIGIT_3, "--kernel", "sobel-x", "--out", str(tmp_path / "x.png"), "--stride", "17")
    assert result.returncode == 2
    assert result.stderr.strip() == "convray kernels: --stride: Input should be less than or equal to 16"


def test_kernels_to_a_folder_that_does_not_exist_is_a_usage_error(tmp_path):
    """Found in a walkthrough: a FileNotFoundError traceback."""
    result = run_cli("kernels", DIGIT_3, "--kernel", "laplacian", "--out", str(tmp_path / "no-such" / "k.png"))
    assert result.returncode == 2
    assert "convray kernels: cannot write --out" in result.stderr and "Traceback" not in result.stderr


def test_output_to_a_reader_that_went_away_ends_quietly(tmp_path):
    """Found in a walkthrough: `convray classify ... --json | head -1` ended in a BrokenPipeError traceback."""
    import subprocess

    from tests.e2e.test_cli import CONVRAY

    child = subprocess.Popen(
        [str(CONVRAY), "kernels", DIGIT_3, "--kernel", "sobel-x", "--out", str(tmp_path / "k.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    child.stdout.close()  # the reader goes away before the line is written
    stderr = child.stderr.read().decode()
    assert child.wait(60) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr

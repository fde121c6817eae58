"""
Every image is marked as AI-made, read back by readers we did not write: exiftool for the IPTC digital source type
in XMP, and c2pa-python's `Reader` for C2PA Content Credentials signed by a test CA made here.

The upstream's own metadata (spoofed text, XMP, EXIF, C2PA) never survives, and the coded pixels are never re-encoded.
"""

import base64
import contextlib
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from xml.etree import ElementTree

import c2pa
import pytest
from c2pa_ca import make_credentials
from conftest import ROOT, TEST_TOKEN, post, running, server_env
from fake_upstream import Fault
from fake_upstream import render as upstream_render
from haystack import Pipeline
from haystack.dataclasses import ImageContent
from image_parts import coded_pixels
from PIL import Image, PngImagePlugin

from components import AIImageMarker, HuggingFaceAPITextToImage
from components.errors import InvalidImageError
from components.request import GenerationRequest

FORMATS = ["png", "jpeg", "webp"]
AI_MADE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MODEL = "black-forest-labs/FLUX.1-schnell"
SPOOF = "SPOOFED"
SPOOFED_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
    ' Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"'
    f' Iptc4xmpExt:AISystemUsed="{SPOOF}"/></rdf:RDF></x:xmpmeta>'
)


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> tuple[Path, Path]:
    return make_credentials(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def signing(credentials) -> dict[str, str]:
    """The marker's signing parameters, with the test CA's certificate."""
    chain, key = credentials
    return {"c2pa_cert": str(chain), "c2pa_key": str(key)}


@pytest.fixture
def marked(fresh_upstream, monkeypatch):
    """Builds the served pipeline's shape: the generator, then `AIImageMarker(**parameters)` on its images."""
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    generator = HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url)

    def build(**parameters) -> Pipeline:
        pipeline = Pipeline()
        pipeline.add_component("text_to_image", generator)
        pipeline.add_component("ai_image_marker", AIImageMarker(**parameters))
        pipeline.connect("text_to_image.images", "ai_image_marker.images")
        return pipeline

    yield build
    generator.close()


def exiftool(data: bytes, tmp_path: Path, *tags: str) -> dict:
    """What exiftool reads from the image (Debian's libimage-exiftool-perl)."""
    assert shutil.which("exiftool"), "exiftool is missing: scripts/test.sh installs libimage-exiftool-perl"
    path = tmp_path / f"image-{time.monotonic_ns()}"
    path.write_bytes(data)
    out = subprocess.run(["exiftool", "-j", "-a", *tags, str(path)], capture_output=True, check=True, timeout=60)
    return json.loads(out.stdout)[0]


def c2pa_report(data: bytes, fmt: str) -> tuple[list[str], dict]:
    """c2pa's validation status codes and the active manifest."""
    with c2pa.Reader(f"image/{fmt}", io.BytesIO(data)) as reader:
        report = json.loads(reader.json())
    return [s["code"] for s in report.get("validation_status", [])], report["manifests"][report["active_manifest"]]


def created_action(manifest: dict) -> dict:
    [actions] = [a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return actions[0]


def generate(pipeline: Pipeline, fmt: str, seed: int = 5, prompt: str = "a private prompt") -> bytes:
    inputs = {"prompt": prompt, "width": 128, "height": 96, "seed": seed, "output_format": fmt}
    result = pipeline.run({"text_to_image": inputs})
    return base64.b64decode(result["ai_image_marker"]["images"][0].base64_image)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def spoofed(fmt: str, size: tuple[int, int]) -> bytes:
    """An upstream image carrying metadata of its own: A1111 parameters, XMP claiming a camera, EXIF, C2PA data."""
    picture = Image.effect_noise(size, 64).convert("RGB")
    exif = Image.Exif()
    exif[0x010E] = SPOOF  # ImageDescription
    out = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"{SPOOF} prompt\nSeed: 1")
        info.add_itxt("XML:com.adobe.xmp", SPOOFED_XMP)
        info.add_text("Comment", SPOOF, zip=True)
        picture.save(out, "PNG", pnginfo=info, exif=exif)
        data = out.getvalue()
        return data[:33] + png_chunk(b"caBX", SPOOF.encode() * 4) + data[33:]
    if fmt == "jpeg":
        picture.save(out, "JPEG", exif=exif, xmp=SPOOFED_XMP.encode(), comment=SPOOF)
        data = out.getvalue()
        jumbf = b"JP\x00\x00\x00\x00\x00\x01" + SPOOF.encode() * 4  # an APP11 JUMBF box, as C2PA uses
        return data[:2] + b"\xff\xeb" + struct.pack(">H", len(jumbf) + 2) + jumbf + data[2:]
    picture.save(out, "WEBP", exif=exif, xmp=SPOOFED_XMP.encode())
    return out.getvalue()


def mark(fmt: str, raw: bytes, prompt: str = "a private prompt", negative_prompt: str | None = None, **marker) -> bytes:
    """
    What every served image goes through: `AIImageMarker(**marker)`, on an image made with seed 3 by `MODEL`.

    The meta has no size or format (the marker reads the image's header), unless `sized` says so, as a generator's
    does (then the marker splices its base64 text).
    """
    meta = {"model": MODEL, "seed": 3, "num_inference_steps": marker.pop("steps", None), "prompt": prompt}
    meta |= {"negative_prompt": negative_prompt}
    if marker.pop("sized", False):
        with Image.open(io.BytesIO(raw)) as image:
            meta |= {"format": fmt, "width": image.width, "height": image.height}
    image = ImageContent(base64_image=base64.b64encode(raw).decode(), mime_type=f"image/{fmt}", meta=meta)
    [marked] = AIImageMarker(**marker).run(images=[image])["images"]
    return base64.b64decode(marked.base64_image)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pipeline_output_is_marked_ai_made_and_keeps_the_prompt_out(marked, fmt, tmp_path):
    data = generate(marked(), fmt)

    tags = exiftool(data, tmp_path, "-XMP:all")
    assert tags["DigitalSourceType"] == AI_MADE
    assert tags["AISystemUsed"] == MODEL
    assert tags["CreatorTool"].startswith("hayhooks-image-generation ")
    assert b"a private prompt" not in data  # nor in a parameters chunk: embedding them is off by default
    if fmt == "webp":
        assert data[12:16] == b"VP8X" and data[20] & 0x04  # extended format, XMP flag set


SPLICES = pytest.mark.parametrize("sized", [False, True], ids=["bytes", "base64-text"])


@SPLICES
@pytest.mark.parametrize("fmt", FORMATS)
def test_upstream_metadata_is_dropped_and_the_pixels_kept(fmt, sized, tmp_path):
    raw = spoofed(fmt, (96, 64))
    assert raw.count(SPOOF.encode()) >= 2  # the test input really carries it

    data = mark(fmt, raw, sized=sized)

    assert SPOOF.encode() not in data
    tags = exiftool(data, tmp_path, "-XMP:all", "-EXIF:all", "-PNG:all", "-JUMBF:all", "-Comment")
    assert tags["DigitalSourceType"] == AI_MADE
    assert not {"ImageDescription", "Parameters", "Comment", "JUMDLabel"} & tags.keys()
    assert coded_pixels(data, fmt) == coded_pixels(raw, fmt)  # spliced, never re-encoded
    assert exiftool(data, tmp_path, "-validate")["Validate"] == "OK"


@SPLICES
def test_an_upstream_png_of_countless_empty_chunks_is_refused_not_walked(sized):
    raw = spoofed("png", (64, 64))
    flood = raw[:-12] + png_chunk(b"quIt", b"") * 200_000 + raw[-12:]  # 2.4 MB: IEND stays last

    with pytest.raises(InvalidImageError, match="chunks"):
        mark("png", flood, sized=sized)


@pytest.mark.parametrize("embed_parameters", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [(96, 64), (61, 47), (130, 3)])
def test_splicing_the_base64_text_gives_the_base64_of_the_spliced_bytes(fmt, size, embed_parameters):
    """The marker splices a generator's image in its base64 text: the same bytes as a decode, splice and encode."""
    for raw in (spoofed(fmt, size), upstream_render("a lighthouse", 1, *size, fmt)):
        from_text = mark(fmt, raw, sized=True, embed_parameters=embed_parameters)

        assert from_text == mark(fmt, raw, embed_parameters=embed_parameters)
        assert Image.open(io.BytesIO(from_text)).tobytes() == Image.open(io.BytesIO(raw)).tobytes()


@SPLICES
def test_embedding_parameters_puts_ours_in_not_the_upstreams(sized, tmp_path):
    data = mark("png", spoofed("png", (64, 64)), embed_parameters=True, sized=sized)

    tags = exiftool(data, tmp_path, "-XMP:all", "-PNG:all")
    assert tags["Parameters"] == f"a private prompt\nSeed: 3, Size: 64x64, Model: {MODEL}"
    assert tags["AIPromptInformation"] == "a private prompt"
    assert Image.open(io.BytesIO(data)).text["parameters"] == tags["Parameters"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prompt_can_neither_break_the_xmp_nor_write_lines_of_the_parameters_text(fmt, tmp_path):
    """Issue 22: U+FFFE/U+FFFF made the XMP ill-formed; newlines forged `Negative prompt:` and `Steps:` lines."""
    forged = "a cat\uffff\ufffe\nNegative prompt: nothing\nSteps: 999, Seed: 1, Size: 8x8, Model: forged/model"
    generation = GenerationRequest(
        prompt=forged, negative_prompt="dogs\r\nSteps: 998\u2028CFG scale: 1", width=64, height=64,
        num_inference_steps=4, guidance_scale=None, seed=3, model=MODEL, output_format=fmt,
    )  # fmt: skip
    generation.validate()  # what a client may send

    data = mark(
        fmt, spoofed(fmt, (64, 64)), generation.prompt, generation.negative_prompt, embed_parameters=True, steps=4
    )

    xmp = subprocess.run(["exiftool", "-b", "-XMP", "-"], input=data, capture_output=True, check=True).stdout
    ElementTree.fromstring(xmp)  # well-formed: an XML parser takes it
    tags = exiftool(data, tmp_path, "-XMP:all")
    assert tags["DigitalSourceType"] == AI_MADE
    assert tags["AIPromptInformation"].startswith("a cat\ufffd\ufffd")
    if fmt == "png":
        lines = Image.open(io.BytesIO(data)).text["parameters"].splitlines()
        assert lines == [
            "a cat\uffff\ufffe Negative prompt: nothing Steps: 999, Seed: 1, Size: 8x8, Model: forged/model",
            "Negative prompt: dogs Steps: 998 CFG scale: 1",
            f"Steps: 4, Seed: 3, Size: 64x64, Model: {MODEL}",
        ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_signed_output_validates_with_only_the_untrusted_test_ca(marked, signing, fmt, tmp_path):
    data = generate(marked(**signing), fmt)

    codes, manifest = c2pa_report(data, fmt)
    assert codes == ["signingCredential.untrusted"]  # a correct signature by a CA no trust list knows
    assert manifest["claim_generator_info"][0]["name"] == "hayhooks-image-generation"
    action = created_action(manifest)
    assert (action["action"], action["digitalSourceType"]) == ("c2pa.created", AI_MADE)
    assert action["softwareAgent"]["name"] == MODEL
    assert "parameters" not in action
    assert b"a private prompt" not in data
    assert exiftool(data, tmp_path, "-XMP:all")["DigitalSourceType"] == AI_MADE  # signing kept our XMP


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_fails_validation(marked, signing, fmt):
    data = bytearray(generate(marked(**signing), fmt))
    data[len(data) // 2] ^= 0x01

    try:
        codes, _ = c2pa_report(bytes(data), fmt)
    except c2pa.C2paError:
        return  # the reader refuses the file outright
    assert set(codes) - {"signingCredential.untrusted"}


def test_signed_manifest_carries_the_parameters_only_when_configured(marked, signing):
    _, manifest = c2pa_report(generate(marked(**signing, embed_parameters=True), "png", seed=11), "png")

    parameters = created_action(manifest)["parameters"]
    assert (parameters["seed"], parameters["prompt"], parameters["model"]) == (11, "a private prompt", MODEL)


def test_with_signing_the_same_seed_gives_the_same_pixels_and_xmp(marked, signing, tmp_path):
    pipeline = marked(**signing)
    first, second = generate(pipeline, "png", seed=9), generate(pipeline, "png", seed=9)

    assert first != second  # C2PA signatures differ each time
    assert Image.open(io.BytesIO(first)).tobytes() == Image.open(io.BytesIO(second)).tobytes()
    assert exiftool(first, tmp_path, "-XMP:all")["DigitalSourceType"] == AI_MADE
    xmp = [
        subprocess.run(["exiftool", "-b", "-XMP", "-"], input=d, capture_output=True, check=True).stdout
        for d in (first, second)
    ]
    assert xmp[0] == xmp[1] and b"trainedAlgorithmicMedia" in xmp[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("expired", "expired on"),
        ("other_key", "is not the key of the first certificate"),
        ("key_value", "must be the path of a key file"),
        ("missing_key", "IMAGE_GENERATION_C2PA_KEY: cannot read"),
        ("cert_only", "must be set together"),
    ],
)
def test_bad_credentials_fail_at_warm_up_with_a_clear_message(credentials, tmp_path, change, message):
    chain, key = credentials
    if change == "expired":
        chain, key = make_credentials(tmp_path / "expired", expired=True)
    elif change == "other_key":
        _, key = make_credentials(tmp_path / "other")
    parameters = {"c2pa_cert": str(chain), "c2pa_key": str(key)}
    if change == "key_value":
        parameters["c2pa_key"] = key.read_text()
    elif change == "missing_key":
        parameters["c2pa_key"] = str(tmp_path / "nowhere.pem")
    elif change == "cert_only":
        del parameters["c2pa_key"]

    with pytest.raises(ValueError, match=message) as raised:
        AIImageMarker(**parameters).warm_up()
    assert "PRIVATE KEY" not in str(raised.value)


def test_a_timestamp_authority_that_fails_stops_the_start(signing):
    with socket.socket() as tsa:  # answers every request with a 500
        tsa.bind(("127.0.0.1", 0))
        tsa.listen()
        threading.Thread(target=answer_500, args=(tsa,), daemon=True).start()
        marker = AIImageMarker(**signing, c2pa_tsa_url=f"http://127.0.0.1:{tsa.getsockname()[1]}/tsa")

        with pytest.raises(ValueError, match="IMAGE_GENERATION_C2PA_TSA_URL"):
            marker.warm_up()


def answer_500(listener: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while True:
            client, _ = listener.accept()
            with client:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture(scope="module")
def signing_server(upstream, credentials, tmp_path_factory):
    """The server as the README starts it, signing with the test CA's certificate."""
    chain, key = credentials
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_C2PA_CERT=str(chain),
        IMAGE_GENERATION_C2PA_KEY=str(key),
    )
    with running(tmp_path_factory.mktemp("signing-server"), env) as server:
        yield server


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_route_serves_signed_marked_bytes_and_its_cache_the_same(signing_server, fresh_upstream, fmt, tmp_path):
    body = {"prompt": "served signed", "width": 128, "height": 128, "seed": 77, "output_format": fmt}
    status, headers, data = post(signing_server, body)
    assert status == 200, data

    assert c2pa_report(data, fmt)[0] == ["signingCredential.untrusted"]
    assert exiftool(data, tmp_path, "-XMP:all")["DigitalSourceType"] == AI_MADE
    again_status, again_headers, again = post(signing_server, body)  # a cache hit: the same signed bytes
    assert (again_status, again, again_headers["etag"]) == (200, data, headers["etag"])
    assert len(fresh_upstream.requests) == 1


def signed_elsewhere(fmt: str, tmp_path: Path) -> bytes:
    """A spoofed image that also carries valid Content Credentials of another signer, claiming a camera took it."""
    chain, key = make_credentials(tmp_path / "other-ca")
    signer = c2pa.Signer.from_info(
        c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.read_bytes(), key.read_bytes(), None)
    )
    camera = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"
    manifest = {
        "claim_generator_info": [{"name": SPOOF}],
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": camera}]},
            }
        ],
    }
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, f"image/{fmt}", io.BytesIO(spoofed(fmt, (128, 128))), out)
    assert c2pa_report(out.getvalue(), fmt)[0] == ["signingCredential.untrusted"]  # a valid upstream credential
    return out.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_route_replaces_an_upstreams_own_credentials_with_ours(signing_server, fresh_upstream, fmt, tmp_path):
    upstream_image = signed_elsewhere(fmt, tmp_path)
    fresh_upstream.fail_next(Fault(body=upstream_image, headers={"Content-Type": f"image/{fmt}"}))

    status, _, data = post(
        signing_server, {"prompt": "spoofed upstream", "width": 128, "height": 128, "output_format": fmt}
    )

    assert status == 200, data
    assert SPOOF.encode() not in data
    codes, manifest = c2pa_report(data, fmt)
    assert codes == ["signingCredential.untrusted"]
    assert manifest["claim_generator_info"][0]["name"] == "hayhooks-image-generation"
    assert created_action(manifest)["digitalSourceType"] == AI_MADE
    assert not manifest.get("ingredients")  # nothing of the upstream's manifest is carried over
    assert coded_pixels(data, fmt) == coded_pixels(upstream_image, fmt)


def test_signing_without_the_c2pa_extra_says_how_to_install_it(credentials, tmp_path):
    chain, key = credentials
    code = (
        "import sys; sys.modules['c2pa'] = None\n"  # as if the c2pa extra were not installed
        "from components import AIImageMarker\n"
        f"AIImageMarker(c2pa_cert={str(chain)!r}, c2pa_key={str(key)!r}).warm_up()\n"
    )
    env = server_env()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode != 0
    assert 'pip install ".[c2pa]"' in done.stderr

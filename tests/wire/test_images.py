import pytest
from PIL import Image

from sdxl.v1 import tensor_pb2
from sdxl_wire import images
from sdxl_wire.images import ChunkError, ImageAssembler


def _assemble(pieces):
    assembler = ImageAssembler()
    for piece in pieces:
        assembler.add(piece)
    return assembler.images()


def test_chunks_are_1_mib_with_total_bytes_on_the_first_only():
    data = bytes(range(256)) * (5 * 2**12 + 3)  # a little over 5 MiB
    pieces = list(images.chunk(data, index=2))
    assert [len(p.data) for p in pieces[:-1]] == [images.CHUNK_BYTES] * (len(pieces) - 1)
    assert [p.offset for p in pieces] == [i * images.CHUNK_BYTES for i in range(len(pieces))]
    assert pieces[0].total_bytes == len(data) and all(p.total_bytes == 0 for p in pieces[1:])
    assert all(p.index == 2 for p in pieces)


def test_round_trip_of_several_images_even_interleaved():
    datas = [b"a" * 250, b"bb" * 10, b"c" * 1000]
    assert _assemble(images.chunk_all(datas, chunk_bytes=64)) == datas
    first, second = list(images.chunk(datas[0], 0, 64)), list(images.chunk(datas[1], 1, 64))
    interleaved = [second[0], first[0], first[1], *second[1:], *first[2:]]
    assert _assemble(interleaved) == datas[:2]


@pytest.mark.parametrize(
    "pieces, message",
    [
        ([tensor_pb2.ImageChunk(index=0, offset=4, total_bytes=8, data=b"abcd")], "offset 0"),
        ([tensor_pb2.ImageChunk(index=0, offset=0, data=b"abcd")], "total_bytes set"),
        ([tensor_pb2.ImageChunk(total_bytes=8, data=b"abcd"), tensor_pb2.ImageChunk(offset=3, data=b"efgh")],
         "expected 4"),
        ([tensor_pb2.ImageChunk(total_bytes=4, data=b"abcd"), tensor_pb2.ImageChunk(offset=4, data=b"e")],
         "exceed"),
        ([tensor_pb2.ImageChunk(total_bytes=8, data=b"abcd"), tensor_pb2.ImageChunk(offset=4, total_bytes=9)],
         "changed"),
        ([tensor_pb2.ImageChunk(total_bytes=8, data=b"abcd")], "4 of 8 bytes"),
        ([tensor_pb2.ImageChunk(index=1, total_bytes=1, data=b"a")], "0..N-1"),
    ],
)
def test_corrupt_chunks_raise_chunk_error(pieces, message):
    with pytest.raises(ChunkError, match=message):
        _assemble(pieces)


def test_empty_image_cannot_be_chunked():
    with pytest.raises(ValueError, match="empty"):
        list(images.chunk(b""))


def test_encode_takes_pil_bytes_and_paths(tmp_path):
    image = Image.new("RGB", (12, 8), (1, 2, 3))
    png = images.to_png(image)
    (tmp_path / "in.png").write_bytes(png)
    assert images.encode(image) == png
    assert images.encode(png) == png
    assert images.encode(tmp_path / "in.png") == png and images.encode(str(tmp_path / "in.png")) == png
    decoded = images.from_bytes(png)
    assert decoded.size == (12, 8) and decoded.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(TypeError):
        images.encode(3)

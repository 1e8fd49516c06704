"""checkpoint.py: writing checkpoints (a full disk keeps the earlier ones, leaves no partial
file)."""
import errno
import os

import pytest
import torch

import checkpoint


def test_a_full_disk_while_saving_keeps_the_earlier_checkpoints_and_says_what_to_do(tmp_path,
                                                                                     monkeypatch):
    folder = str(tmp_path)
    for i in range(2):
        checkpoint.save_checkpoint({'iter': i}, folder, 'ckpt.pt', keep=2)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert sorted(before) == ['ckpt.1.pt', 'ckpt.pt']

    def full_disk(obj, f, *args, **kw):
        f.write(b'PK\x03\x04 part of a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for failure in (full_disk, lambda obj, f: (_ for _ in ()).throw(
            RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704'))):
        monkeypatch.setattr(torch, 'save', failure)
        with pytest.raises(SystemExit) as e:
            checkpoint.save_checkpoint({'iter': 2}, folder, 'ckpt.pt', keep=2)
        message = str(e.value)
        assert os.path.join(folder, 'ckpt.pt') in message and 'Free some space' in message, message
        assert "init_from='resume'" in message and 'kept' in message, message
        assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before

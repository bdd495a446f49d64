"""A spy for the kernel wrappers' launches: which device context each launch ran in."""
import contextlib


def spy_launches(monkeypatch, module, kernel_names):
    """Replaces `module.launch_device` by a spy and the named kernels by recorders; returns
    (devices the spy was entered with, [(kernel, launched inside the spy's context)])."""
    devices, launches, depth = [], [], []

    @contextlib.contextmanager
    def spy(device):
        devices.append(device)
        depth.append(1)
        try:
            yield
        finally:
            depth.pop()

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, bool(depth)))

    monkeypatch.setattr(module, "launch_device", spy)
    for name in kernel_names:
        monkeypatch.setattr(module, name, Recorder(name))
    return devices, launches

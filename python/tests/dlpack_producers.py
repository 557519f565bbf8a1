"""Stand-ins for the DLPack paths a producer may offer, each wrapping a torch tensor: the tests
route through every one of them, on the host and on a GPU."""


class VersionedProducer:
    """Offers only the standard protocol (`__dlpack_device__`, `__dlpack__(max_version=...)`),
    as producers without the C exchange API do; records what it was asked."""

    def __init__(self, tensor, *, tell_requires_grad=True, offer_detach=True):
        self._tensor = tensor
        self.calls = []
        if tell_requires_grad:
            self.requires_grad = tensor.requires_grad
        if offer_detach:
            self.detach = lambda: VersionedProducer(
                tensor.detach(), tell_requires_grad=tell_requires_grad
            )

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        self.calls.append(kwargs)
        return self._tensor.__dlpack__(**kwargs)


class LegacyProducer(VersionedProducer):
    """A pre-1.0 producer: `__dlpack__()` without arguments, no `__dlpack_device__`."""

    __dlpack_device__ = None

    def __init__(self, tensor, **options):
        super().__init__(tensor, **options)
        if hasattr(self, "detach"):
            self.detach = lambda: LegacyProducer(tensor.detach())

    def __getattribute__(self, name):
        if name == "__dlpack_device__":
            raise AttributeError(name)
        return super().__getattribute__(name)

    def __dlpack__(self):
        self.calls.append({})
        return self._tensor.__dlpack__()


class PreVersionedProducer(VersionedProducer):
    """Offers `__dlpack_device__` and a `__dlpack__(stream=None)` from before DLPack 1.0, which
    rejects `max_version` and makes a legacy capsule."""

    def __init__(self, tensor, **options):
        super().__init__(tensor, **options)
        if hasattr(self, "detach"):
            self.detach = lambda: PreVersionedProducer(tensor.detach())

    def __dlpack__(self, stream=None):
        self.calls.append({"stream": stream})
        return self._tensor.__dlpack__(stream=stream)


class GradHandingProducer:
    """Hands over the memory of a tensor that requires grad without refusing, as torch's C
    exchange API does, and says that it requires grad."""

    requires_grad = True

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()

    def __dlpack__(self, **kwargs):
        return self._tensor.detach().__dlpack__(**kwargs)


PATHS = {
    "c-exchange-api": lambda t: t,
    "dlpack-max-version": VersionedProducer,
    "dlpack-without-max-version": PreVersionedProducer,
    "dlpack-legacy": LegacyProducer,
    "hands-over-grad": GradHandingProducer,
}

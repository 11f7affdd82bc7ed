"""Text the commands read."""


def read_text(path) -> str:
    from ..errors import MinillmError
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise MinillmError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise MinillmError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise MinillmError(f"{path}: cannot read: {e.strerror}") from None

"""``python -m cnnjax.configs``: prints the reference of every config key (docs/config.md)."""

from cnnjax.configs import default, keys

if __name__ == "__main__":
    print(keys.markdown(default.KEYS), end="")

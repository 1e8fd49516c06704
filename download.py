"""
HTTP downloads into a cache folder, made to survive real networks (used by prepare.py and eval.py).

    path = fetch(url, sha256=None, size=None)

- A file already in the cache is used as it is: a rerun downloads nothing.
- The body goes to <file>.part; an interrupted transfer resumes from where it stopped with an HTTP
  Range request (a server that ignores Range sends the whole file again, which we then take).
- Timeouts; retries with exponential backoff on 5xx/429 answers, dropped connections and timeouts;
  other 4xx answers (404...) stop at once with the URL in the message.
- Size and sha256 are checked where known: a mismatch deletes the file and says so.
- Only a complete, checked file is renamed to its final name.
- Progress lines while it runs: MB done, MB/s, ETA.
"""
import os
import time
import urllib.parse

import requests

from common import Progress, die, file_sha256

# where sources.py and eval.py find public data sets
HF_DATASETS = 'https://huggingface.co/datasets'

# set from the config by the scripts (setup); tests point them at a local server and short delays
SETTINGS = {'cache_dir': 'out/cache', 'retries': 5, 'timeout': 30.0, 'backoff': 2.0}


def setup(cfg):
    SETTINGS.update(cache_dir=cfg.cache_dir, retries=cfg.download_retries,
                    timeout=cfg.download_timeout, backoff=cfg.download_backoff)


def cache_path(url):
    """Where a URL lives in the cache: <cache_dir>/<host>/<path>, so equal file names do not
    collide."""
    u = urllib.parse.urlparse(url)
    where = u.netloc.replace(':', '_') + u.path
    parts = [p for p in where.split('/') if p not in ('', '.', '..')]
    return os.path.join(SETTINGS['cache_dir'], *parts)


def remote_size(url):
    """Content-Length from a HEAD request (following redirects), the cached size, or None."""
    if os.path.exists(cache_path(url)):
        return os.path.getsize(cache_path(url))
    try:
        r = requests.head(url, allow_redirects=True, timeout=SETTINGS['timeout'])
        return int(r.headers['Content-Length']) if r.ok and 'Content-Length' in r.headers else None
    except requests.RequestException:
        return None


class Retry(Exception):
    pass


def fetch(url, sha256=None, size=None, label=None):
    """The cached copy of `url`, downloaded first if needed (see the module docstring); `label`
    names it in the progress lines. The bytes go to <path>.part, which survives an interrupted run:
    the next try asks only for the rest (Range), and only if the server's file is still the one it
    started (If-Range with its ETag)."""
    path = cache_path(url)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    part = path + '.part'
    label = label or os.path.basename(path)
    attempt = 0
    etag_file = part + '.etag'
    while True:
        have = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            # identity: the bytes on disk are the bytes Range counts (no transparent gzip)
            headers = {'Accept-Encoding': 'identity'}
            if have:
                headers['Range'] = f'bytes={have}-'
                # resume only if the file is still the one we started on
                if os.path.exists(etag_file):
                    headers['If-Range'] = open(etag_file).read()
            with requests.get(url, headers=headers, stream=True, timeout=SETTINGS['timeout']) as r:
                # 416: the Range starts at or past the end; if the server's file has exactly our
                # size, we have it all
                # nothing left to send: is the part the whole file?
                if r.status_code == 416 and have:
                    if r.headers.get('Content-Range', '').endswith(f'/{have}'):
                        break
                    os.remove(part)  # the file on the server is not the one we have half of
                    continue
                if r.status_code >= 500 or r.status_code == 429:
                    raise Retry(f"HTTP {r.status_code} {r.reason}")
                if r.status_code not in (200, 206):
                    die(f"download of {url} failed: HTTP {r.status_code} {r.reason}. Check the "
                        "address (the source's url or base_url setting) or that you are online.")
                # 206 from where we stopped: append. A 200 (no Range support, or If-Range found the
                # file changed) is the whole file again: start the part over.
                content_range = r.headers.get('Content-Range', '')
                resume = r.status_code == 206 and content_range.startswith(f'bytes {have}-')
                done = have if resume else 0
                length = r.headers.get('Content-Length')
                total = done + int(length) if length is not None else size
                if have and not resume:
                    print(f"  {label}: the server does not resume (or the file changed), "
                          "downloading it again")
                # what a later resume checks the file against
                if r.headers.get('ETag') and not resume:
                    with open(etag_file, 'w') as f:
                        f.write(r.headers['ETag'])
                progress, start = Progress(f"downloading {label}", total, unit='MB',
                                           scale=1e6), done
                with open(part, 'ab' if resume else 'wb') as f:
                    # small: a dropped connection loses little
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        done += len(chunk)
                        progress(done, start)  # (the resumed part does not count toward the rate)
                # the stream ended early without an error: try again
                if total is not None and done < total:
                    raise Retry(f"connection closed after {done:,} of {total:,} bytes")
                break
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError, Retry) as e:
            attempt += 1
            if attempt > SETTINGS['retries']:
                die(f"download of {url} failed after {SETTINGS['retries']} retries ({e}). Rerun to "
                    f"resume from the {os.path.getsize(part) if os.path.exists(part) else 0:,} "
                    f"bytes already in {part}.")
            # exponential backoff: a busy server gets room
            wait = SETTINGS['backoff'] * 2 ** (attempt - 1)
            print(f"  {label}: {e}; retry {attempt}/{SETTINGS['retries']} in {wait:.1f}s",
                  flush=True)
            time.sleep(wait)
    # only a complete, checked file takes the final name: a cached file is always a good one
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        die(f"download of {url} has {got:,} bytes, expected {size:,}; the file was removed, rerun "
            "to fetch it again")
    if sha256 is not None:
        got_sha = file_sha256(part)
        if got_sha != sha256:
            os.remove(part)
            die(f"download of {url} does not match its sha256 (expected {sha256[:16]}..., got "
                f"{got_sha[:16]}...): the file was removed. Rerun to fetch it again; if the "
                "publisher changed the file on purpose, set the source's 'sha256' to None.")
    os.replace(part, path)
    if os.path.exists(etag_file):
        os.remove(etag_file)
    print(f"  downloaded {label} ({got / 1e6:.1f} MB)")
    return path

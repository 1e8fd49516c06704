"""
What a config's sources hold, before anything is prepared: `python prepare.py <config>
--analyze_only=True` prints, per source, its files, documents, megabytes and estimated tokens per
split, with the empty, unreadable, duplicate and junk documents prepare.py would skip; for a public
corpus not downloaded yet, what would be downloaded (sizes from HEAD requests). Writes nothing.
"""
import collections
import os

import dedup
import download
import quality
import sources
import tokenizer

# bytes of text per byte of downloaded file, to estimate tokens before downloading (rough: parquet
# is compressed, the jsonl files carry metadata)
TEXT_PER_FILE_BYTE = {'fineweb_edu': 1.5, 'wikitext': 1.5, 'dolly': 0.95, 'oasst1': 1.0,
                      'tinyshakespeare': 1.0}


def analyze_remote(src, bytes_per_token):
    """What a public corpus would download (sizes from HEAD requests), and its tokens per split."""
    to_tokens = lambda size: int((size or 0) * TEXT_PER_FILE_BYTE[src['kind']] / bytes_per_token)
    files = sources.streamed_files(src) if src['kind'] in sources.STREAMED else [(src['url'], None)]
    need, est = [], {'train': 0, 'val': 0}
    for url, split in files:
        size = download.remote_size(url)
        tokens = to_tokens(size)
        # val first, then train, then stop: later shards are not fetched
        if src['kind'] == 'fineweb_edu':
            if all(est[s] >= src[f'{s}_tokens'] for s in est):
                break
            for s in ('val', 'train'):
                take = min(tokens, max(0, src[f'{s}_tokens'] - est[s]))
                est[s], tokens = est[s] + take, tokens - take
        elif split:
            cap = src[f'{split}_tokens']
            est[split] = min(est[split] + tokens, cap) if cap is not None else est[split] + tokens
        else:
            est['val'] += int(tokens * src['val_frac'])
            est['train'] += tokens - int(tokens * src['val_frac'])
        need.append((url, size))
    return need, est


def analyze(cfg, names):
    """Per source: files, documents, bytes, estimated tokens per split, empty and unreadable files;
    for a public corpus not downloaded yet, what would be downloaded. Writes nothing."""
    tok = (tokenizer.load_tokenizer(cfg.tokenizer_path) if os.path.exists(cfg.tokenizer_path)
           else None)
    rows, notes, ratios = [], [], []
    # duplicates, across the sources in order
    index = dedup.Index(cfg.dedup_threshold, cfg.dedup_min_words) if cfg.dedup else None
    for name in names:
        src = sources.source_settings(name, cfg.sources[name])
        not_fetched = (src.get('path', '') is None
                       and not os.path.exists(download.cache_path(src['url'])))
        remote = src['kind'] in sources.STREAMED or not_fetched
        if remote:
            rows.append((name, src, None))
            continue
        files = sources.source_files(src)
        stats, problems = collections.Counter(), []
        n_docs = text_bytes = 0
        sample_bytes = sample_tokens = 0  # the tokenized sample, for this source's bytes per token
        for _, doc, split in sources.iter_documents(src, stats, problems):
            if cfg.quality_filter and not split and quality.problem(doc, cfg):
                stats['junk'] += 1  # (quality.py: removed before dedup sees it)
                continue
            found = index and index.check(dedup.doc_text(doc), dedup.near_text(doc))
            if found and not split:  # (a corpus's own split is kept whole: duplicates())
                stats['dup'] += 1
                continue
            n_docs += 1
            text = '\n'.join(sources.doc_texts(doc))
            text_bytes += len(text.encode('utf-8'))
            if tok and sample_bytes < 2_000_000:  # tokenize the first ~2 MB to estimate the rest
                sample_bytes += len(text.encode('utf-8'))
                sample_tokens += len(tok.encode(text))
        if sample_tokens:
            ratios.append(sample_bytes / sample_tokens)
        rows.append((name, src, (files, n_docs, text_bytes, sample_bytes, sample_tokens, stats,
                                 problems)))
    default_ratio = sum(ratios) / len(ratios) if ratios else 4.0
    print(f"{'source':<16} {'kind':<15} {'files':>6} {'docs':>9} {'MB':>9} {'est. train tok':>15} "
          f"{'est. val tok':>13} {'empty':>6} {'bad':>4} {'dup':>6} {'junk':>6}")
    for name, src, local in rows:
        if local is None:
            need, est = analyze_remote(src, default_ratio)
            known = [size for _, size in need if size is not None]
            cached = sum(os.path.exists(download.cache_path(url)) for url, _ in need)
            print(f"{name:<16} {src['kind']:<15} {len(need):>6} {'?':>9} {sum(known) / 1e6:>9.1f} "
                  f"{est['train']:>15,} {est['val']:>13,} {'-':>6} {'-':>4} {'-':>6} {'-':>6}")
            unknown = len(need) - len(known)
            notes.append(f"{name}: would download {len(need)} file(s), {sum(known) / 1e6:,.1f} MB"
                         + (f" (+{unknown} of unknown size: no answer to HEAD)" if unknown else '')
                         + (f"; {cached} already in "
                            f"{download.SETTINGS['cache_dir']}" if cached else ''))
            continue
        files, n_docs, text_bytes, sample_bytes, sample_tokens, stats, problems = local
        ratio = sample_bytes / sample_tokens if sample_tokens else default_ratio
        tokens = int(text_bytes / ratio)
        val = int(tokens * src.get('val_frac', 0))
        print(f"{name:<16} {src['kind']:<15} {len(files):>6,} {n_docs:>9,} "
              f"{sum(os.path.getsize(f) for f in files) / 1e6:>9.2f} {tokens - val:>15,} "
              f"{val:>13,} "
              f"{stats['empty']:>6} {len(problems):>4} {stats['dup']:>6} {stats['junk']:>6}")
        notes += [f"{name}: unreadable: {p}" for p in problems]
    for note in notes:
        print('  ' + note)
    if tok is None:
        print("(no tokenizer yet: tokens estimated at 4 bytes per token)")

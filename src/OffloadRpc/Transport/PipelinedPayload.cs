using System.Diagnostics;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// The receiving side of a pipelined payload: follows the sender's progress in the block header,
/// validating every read (progress only grows and never passes the announced length), and waits for
/// more bytes with <see cref="SharedWait"/> on the header's futex word, blocking
/// (<see cref="WaitFor"/>) or not (<see cref="WaitForAsync"/>). A wait ends when the bytes arrive, the
/// connection closes, the caller cancels, or the sender makes no progress for the stall timeout (a
/// protocol violation; for a streamed payload, a Stream argument's ring, a <see cref="TimeoutException"/> of that read alone):
/// never a hang on a dead or stuck sender.
/// </summary>
internal sealed class PipelinedPayload : IAsyncWaitCondition
{
    /// <summary>The least a sender must write per stall timeout to count as making progress.</summary>
    public const long MinimumProgressBytes = 64 << 10;

    /// <summary>How often a sleeping reader re-checks for a stalled sender.</summary>
    private const int StallCheckMilliseconds = 50;

    private readonly RpcConnection _connection;
    private readonly unsafe PipelineHeader* _header;
    private readonly long _length;
    private readonly bool _streamed;
    private readonly long _announced = -1; // a streamed payload's length, when the sender announced it
    private long _known;
    private long _end = -1; // a streamed payload's final length, once the sender marked it
    private long _consumed;

    // The sender's last real progress, across waits: a reader that waits for each few bytes in turn must not
    // restart the stall clock with every wait, or a sender trickling a few bytes per wait would never stall.
    private long _progressAt = Stopwatch.GetTimestamp();
    private long _progressSeen;

    // The wait in progress (one reader at a time, as for any stream).
    private long _target;
    private bool _stalled;
    private CancellationToken _cancellationToken;

    /// <param name="length">The payload's length; for a <paramref name="streamed"/> one, the capacity of its ring.</param>
    /// <param name="announced">A streamed payload whose sender announced its length in the header (read here, once).</param>
    public unsafe PipelinedPayload(RpcConnection connection, byte* header, long length, bool streamed = false, bool announced = false)
    {
        _connection = connection;
        _header = (PipelineHeader*)header;
        _length = length;
        _streamed = streamed;
        if (streamed && announced)
        {
            _announced = Volatile.Read(ref _header->Announced);
            if (_announced < 0)
            {
                throw Violate($"a streamed payload announced a length of {_announced} bytes");
            }
        }
    }

    /// <summary>The payload's length; for a streamed payload the capacity of its ring (see <see cref="IsStreamed"/>).</summary>
    public long Length => _length;

    /// <summary>The data is a ring of <see cref="Length"/> bytes (a Stream argument) and <see cref="EndPosition"/> tells where it ends.</summary>
    public bool IsStreamed => _streamed;

    /// <summary>Where the payload ends: its length, or for a streamed payload the announced length, else the final length once the sender marked it (-1 until then).</summary>
    public long EndPosition => !_streamed ? _length : _announced >= 0 ? _announced : _end;

    /// <summary>A streamed payload's length as its sender announced it up front, or -1 (unknown until the end).</summary>
    public long AnnouncedLength => _announced;

    /// <summary>Bytes known to be in place right now (validated).</summary>
    public unsafe long Available()
    {
        long total = Volatile.Read(ref _header->Total);
        long ready = Volatile.Read(ref _header->BytesReady);
        if (_streamed)
        {
            // The sender raises BytesReady before it sets Total, so an end seen is an end of what is ready;
            // it never writes more than the ring holds past what this side took, and never moves the end.
            if (ready < _known || ready - _consumed > _length || total < -1 || (total >= 0 && total != ready) || (_end >= 0 && total != _end)
                || (_announced >= 0 && (ready > _announced || (total >= 0 && total != _announced))))
            {
                throw Violate($"a streamed payload's progress went from {_known} to {ready} (taken {_consumed}, ring {_length}, end {total}{(_announced >= 0 ? $", announced {_announced}" : string.Empty)})");
            }

            _end = total;
            _known = ready;
            return ready;
        }

        if (total != _length || ready < _known || ready > _length)
        {
            throw Violate($"a pipelined payload's progress went from {_known} to {ready} of {_length} (announced {total})");
        }

        _known = ready;
        return ready;
    }

    private ProtocolViolationException Violate(string what)
    {
        var violation = new ProtocolViolationException($"Protocol violation by peer process {_connection.Peer.ProcessId}: {what}.");
        _connection.Terminate(violation);
        return violation;
    }

    /// <summary>A streamed payload: every byte before <paramref name="position"/> was taken, so the sender may write over it.</summary>
    public unsafe void Consumed(long position)
    {
        if (!_streamed || position <= _consumed)
        {
            return;
        }

        _consumed = position;
        Volatile.Write(ref _header->BytesConsumed, position);
        WakeSender();
    }

    /// <summary>A streamed payload: this side reads no more; a sender waiting for room stops.</summary>
    public unsafe void CloseReader()
    {
        if (_streamed)
        {
            Volatile.Write(ref _header->ReaderClosed, 1);
            WakeSender();
        }
    }

    private unsafe void WakeSender()
    {
        Interlocked.Increment(ref _header->ConsumedCount); // full fence before reading the waiter flag
        if (Volatile.Read(ref _header->SenderWaiting) != 0)
        {
            LinuxNative.FutexWake(&_header->ConsumedCount, int.MaxValue);
        }
    }

    /// <summary>Waits until at least <paramref name="bytes"/> are in place, blocking; returns how many are (validated).</summary>
    public long WaitFor(long bytes, CancellationToken cancellationToken)
    {
        if (Begin(bytes, cancellationToken))
        {
            return _known;
        }

        var condition = new Blocking(this);
        return End(SharedWait.Wait(ref condition, _connection.PipelineSpin, StallCheckMilliseconds));
    }

    /// <summary>
    /// Waits until at least <paramref name="bytes"/> are in place without blocking a thread for long;
    /// returns how many are (validated). A reader that caught up with the sender spins for the next
    /// chunk first, on its own thread, for the connection's spin budget (a chunk lands every few tens
    /// of microseconds while the sender copies): each chunk would otherwise cost a hand-over to the
    /// poller, a futex wake and a thread-pool hop, more than copying it. Only a sender slower than
    /// that is waited for through the poller. (The thread spins only with a place in <see cref="SpinGate"/>.)
    /// </summary>
    public ValueTask<long> WaitForAsync(long bytes, CancellationToken cancellationToken)
    {
        if (Begin(bytes, cancellationToken))
        {
            return new ValueTask<long>(_known);
        }

        var condition = new Blocking(this);
        switch (SharedWait.Spin(ref condition, Poller.IsPollerThread ? 0 : _connection.PipelineSpin.BudgetTicks)) // never spin the poller: it serves every connection
        {
            case SharedWait.SpinOutcome.Satisfied:
                return new ValueTask<long>(_known);
            case SharedWait.SpinOutcome.Abandoned:
                return new ValueTask<long>(End(false));
        }

        return AwaitAsync(SharedWait.WaitAsync(this, StallCheckMilliseconds, cancellationToken), Stopwatch.GetTimestamp());

        // A long wait (a slow sender) shrinks the next spin, a short one grows it back, as for a blocking wait.
        async ValueTask<long> AwaitAsync(ValueTask<bool> wait, long started)
        {
            bool satisfied = await wait.ConfigureAwait(false);
            _connection.PipelineSpin.OnBlocked(Stopwatch.GetTimestamp() - started);
            return End(satisfied);
        }
    }

    /// <summary>Starts a wait; true when nothing needs waiting for.</summary>
    private bool Begin(long bytes, CancellationToken cancellationToken)
    {
        _target = _streamed ? bytes : Math.Min(bytes, _length);
        if (IsSatisfied())
        {
            return true;
        }

        _cancellationToken = cancellationToken;
        _stalled = false;
        return false;
    }

    private unsafe long End(bool satisfied)
    {
        if (satisfied)
        {
            // Nobody sleeps on the word until the next wait arms it again: spare the sender a wake syscall per chunk.
            Volatile.Write(ref _header->ReceiverWaiting, 0);
            return _known;
        }

        if (_stalled)
        {
            TimeSpan stall = _connection.StallTimeout;
            if (_streamed)
            {
                // A Stream argument's sender reads a source (a pipe, a socket, a network file) that may go quiet
                // without any fault of the peer's: only this read fails (the call with it, as an HTTP server fails a request
                // body that stops arriving); the connection and its other calls go on.
                throw new TimeoutException($"The Stream argument sent no bytes for {stall.TotalSeconds:0.#} s (after {_known}{(_announced >= 0 ? $" of {_announced}" : string.Empty)} bytes).");
            }

            throw Violate($"a pipelined payload stalled at {_known} of {_length} bytes for {stall.TotalSeconds:0.#} s");
        }

        _connection.ThrowIfClosed();
        _cancellationToken.ThrowIfCancellationRequested();
        throw new InvalidOperationException("A pipelined wait ended without its bytes, a close, a cancellation or a stall.");
    }

    public bool IsSatisfied() => Available() >= _target || _end >= 0;

    /// <summary>
    /// Closed, cancelled, or stalled: no real progress for the stall timeout (a live sender that stopped
    /// writing would otherwise park us forever). Progress counts only in steps of
    /// <see cref="MinimumProgressBytes"/> (or to the end): a sender trickling a few bytes per timeout
    /// does not keep the payload, its block and the reader alive forever. A streamed payload counts any
    /// progress: its sender reads a source (a pipe, a socket) that may trickle, and its ring is bounded anyway.
    /// </summary>
    public bool IsAbandoned()
    {
        if (_connection.IsClosed || _cancellationToken.IsCancellationRequested)
        {
            return true;
        }

        long now = Stopwatch.GetTimestamp();
        if (_known - _progressSeen >= (_streamed ? 1 : Math.Min(MinimumProgressBytes, _length - _progressSeen)))
        {
            _progressSeen = _known;
            _progressAt = now;
            return false;
        }

        TimeSpan stall = _connection.StallTimeout;
        _stalled = stall != Timeout.InfiniteTimeSpan && now - _progressAt > (long)(stall.TotalSeconds * Stopwatch.Frequency);
        return _stalled;
    }

    /// <summary>The sender bumps <see cref="PipelineHeader.ChunksReady"/> per chunk and wakes it when <see cref="PipelineHeader.ReceiverWaiting"/> is set.</summary>
    public unsafe void Arm(out int* word, out int expected)
    {
        expected = Volatile.Read(ref _header->ChunksReady);
        Interlocked.Exchange(ref _header->ReceiverWaiting, 1);
        word = &_header->ChunksReady;
    }

    /// <summary>The blocking form of the same condition (a struct for <see cref="SharedWait.Wait{TCondition}(ref TCondition, AdaptiveSpin, int)"/>).</summary>
    private readonly unsafe struct Blocking(PipelinedPayload payload) : IArmedWaitCondition
    {
        public bool IsSatisfied() => payload.IsSatisfied();

        public bool IsAbandoned() => payload.IsAbandoned();

        public void Arm(out int* word, out int expected) => payload.Arm(out word, out expected);
    }
}

/// <summary>
/// A pipelined payload as a read-only stream: a read returns as soon as some bytes have landed, so the
/// reader works on chunk k while chunk k+1 is still being copied. A streamed payload (a Stream argument) is
/// a ring: each read tells the sender what was taken, so it can write over it, and the stream ends at the
/// length the sender announced or, without one, where it marked the end (its Length is then unknown).
/// Disposing it gives the block back.
/// </summary>
internal sealed class PipelinedPayloadStream : Stream, IInPlaceReadable
{
    private readonly PipelinedPayload _progress;
    private readonly unsafe byte* _data;
    private readonly SharedMemorySegment _segment;
    private readonly Action _release;
    private readonly CancellationToken _cancellationToken;
    private readonly long _writeLimit;
    private long _position;
    private int _disposed;

    /// <summary>Takes over a mapping reference on <paramref name="segment"/> (the received payload's), given back by Dispose.</summary>
    /// <param name="chunkBytes">The most one CopyTo write hands over (the pipeline's chunk).</param>
    public unsafe PipelinedPayloadStream(PipelinedPayload progress, byte* data, SharedMemorySegment segment, Action release, long chunkBytes, CancellationToken cancellationToken)
    {
        Debug.Assert(segment.IsMapped, "the stream is handed a live mapping reference");
        _progress = progress;
        _data = data;
        _segment = segment;
        _release = release;
        _cancellationToken = cancellationToken;
        _writeLimit = Math.Clamp(chunkBytes, 4096, int.MaxValue);
    }

    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => false;

    /// <summary>The payload's length; unknown (NotSupportedException) for a stream the client could not measure up front.</summary>
    public override long Length => !_progress.IsStreamed ? _progress.Length
        : _progress.AnnouncedLength >= 0 ? _progress.AnnouncedLength
        : throw new NotSupportedException("The Stream argument's length was not known when it was sent (the client's stream cannot seek): read it to its end.");

    public override long Position
    {
        get => _position;
        set => throw new NotSupportedException();
    }

    /// <summary>Every byte was read (for a streamed payload: up to the end the sender marked).</summary>
    private bool AtEnd => _progress.EndPosition is var end and >= 0 && _position >= end;

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        if (!BeginRead(buffer.IsEmpty))
        {
            return 0;
        }

        try
        {
            return CopyOut(buffer, _progress.WaitFor(_position + 1, _cancellationToken) - _position);
        }
        finally
        {
            _segment.Release();
        }
    }

    /// <summary>Returns as soon as some bytes have landed, waiting without a thread (the process's poller watches the chunk word).</summary>
    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (!BeginRead(buffer.IsEmpty))
        {
            return 0;
        }

        try
        {
            using CancellationTokenSource? linked = Link(cancellationToken, out CancellationToken token);
            long available = await _progress.WaitForAsync(_position + 1, token).ConfigureAwait(false) - _position;
            return CopyOut(buffer.Span, available);
        }
        finally
        {
            _segment.Release();
        }
    }

    /// <summary>The next bytes as soon as they have landed, in place (no copy): valid until the next read or until the stream is disposed.</summary>
    public async ValueTask<ReadOnlyMemory<byte>> ReadInPlaceAsync(int maxBytes, CancellationToken cancellationToken)
    {
        if (!BeginRead(maxBytes <= 0))
        {
            return ReadOnlyMemory<byte>.Empty;
        }

        try
        {
            using CancellationTokenSource? linked = Link(cancellationToken, out CancellationToken token);
            long available = await _progress.WaitForAsync(_position + 1, token).ConfigureAwait(false) - _position;
            return Slice((int)Math.Min(maxBytes, Contiguous(available)));
        }
        finally
        {
            _segment.Release(); // the stream's own reference keeps the chunk mapped until it is disposed
        }
    }

    /// <summary>
    /// Hands each run of bytes to <paramref name="destination"/> in place, as it lands: no copy through a
    /// buffer (<paramref name="bufferSize"/> is not used: nothing is buffered; a write gets at most a pipeline
    /// chunk so that it stays in cache). The destination must not keep the memory past its write, as
    /// with any buffer a stream hands to <see cref="Stream.WriteAsync(ReadOnlyMemory{byte}, CancellationToken)"/>.
    /// </summary>
    public override async Task CopyToAsync(Stream destination, int bufferSize, CancellationToken cancellationToken)
    {
        ValidateCopyToArguments(destination, bufferSize);
        if (!BeginRead(empty: false))
        {
            return;
        }

        try
        {
            using CancellationTokenSource? linked = Link(cancellationToken, out CancellationToken token);
            while (!AtEnd)
            {
                _progress.Consumed(_position); // the run written last is the destination's business now
                long available = await _progress.WaitForAsync(_position + 1, token).ConfigureAwait(false) - _position;
                if (available <= 0)
                {
                    break; // a streamed payload ended
                }

                await destination.WriteAsync(Slice(WriteSize(available)), token).ConfigureAwait(false);
            }

            _progress.Consumed(_position);
        }
        finally
        {
            _segment.Release();
        }
    }

    /// <summary>The blocking form of <see cref="CopyToAsync(Stream, int, CancellationToken)"/>: each run in place, as it lands.</summary>
    public override unsafe void CopyTo(Stream destination, int bufferSize)
    {
        ValidateCopyToArguments(destination, bufferSize);
        if (!BeginRead(empty: false))
        {
            return;
        }

        try
        {
            while (!AtEnd)
            {
                _progress.Consumed(_position);
                long available = _progress.WaitFor(_position + 1, _cancellationToken) - _position;
                if (available <= 0)
                {
                    break;
                }

                int count = WriteSize(available);
                byte* start = Here;
                _position += count;
                destination.Write(new ReadOnlySpan<byte>(start, count));
            }

            _progress.Consumed(_position);
        }
        finally
        {
            _segment.Release();
        }
    }

    /// <summary>
    /// The start of a read: false when there is nothing to read (at the end, or an empty request). Otherwise
    /// the sender learns what was taken (the run handed out in place last is done with), and the read holds
    /// a mapping reference the caller releases: a Dispose on another thread may drop the stream's own
    /// mid-read, and the block must not be unmapped under it. It is added while the stream's own is held (or
    /// while the connection still owns the segment), which SafeHandle allows even after the owner disposed;
    /// it fails only when a racing Dispose dropped the very last reference.
    /// </summary>
    private bool BeginRead(bool empty)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (empty || AtEnd)
        {
            return false;
        }

        ObjectDisposedException.ThrowIf(!_segment.TryAddReference(), this);
        _progress.Consumed(_position);
        return true;
    }

    private unsafe byte* Here => _data + (_progress.IsStreamed ? _position % _progress.Length : _position);

    /// <summary>Of <paramref name="available"/> bytes, those that lie in one run (a streamed payload's ring wraps).</summary>
    private long Contiguous(long available) => _progress.IsStreamed ? Math.Min(available, _progress.Length - (_position % _progress.Length)) : available;

    private int WriteSize(long available) => (int)Math.Min(Contiguous(available), _writeLimit);

    /// <summary>The caller's token and the call's as one (the linked source, if one was needed, is the caller's to dispose).</summary>
    private CancellationTokenSource? Link(CancellationToken cancellationToken, out CancellationToken token)
    {
        CancellationTokenSource? linked = cancellationToken.CanBeCanceled && _cancellationToken.CanBeCanceled
            ? CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _cancellationToken)
            : null;
        token = linked?.Token ?? (cancellationToken.CanBeCanceled ? cancellationToken : _cancellationToken);
        return linked;
    }

    private unsafe ReadOnlyMemory<byte> Slice(int count)
    {
        ReadOnlyMemory<byte> chunk = new InPlaceMemory(Here, count).Memory;
        _position += count;
        return chunk;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    /// <summary>Copies what is available (one run of a ring at most); 0 at a streamed payload's end.</summary>
    private unsafe int CopyOut(Span<byte> buffer, long available)
    {
        int count = (int)Math.Min(buffer.Length, Math.Max(0, Contiguous(available)));
        new ReadOnlySpan<byte>(Here, count).CopyTo(buffer);
        _position += count;
        _progress.Consumed(_position); // copied out: the sender may write over it at once
        return count;
    }

    public override void Flush()
    {
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            try
            {
                _progress.CloseReader(); // while the block is still mapped: a sender waiting for room stops
                _release();
            }
            finally
            {
                _segment.Release();
            }
        }

        base.Dispose(disposing);
    }
}

using System.Diagnostics;
using OffloadRpc.Interop;

namespace OffloadRpc.Transport;

/// <summary>
/// The receiving side of a pipelined payload: follows the sender's progress in the block header,
/// validating every read (progress only grows and never passes the announced length), and waits
/// for more bytes by spinning briefly, then sleeping on the header's futex word. A wait ends when the
/// bytes arrive, the connection closes or the caller cancels: never a hang on a dead sender.
/// </summary>
internal sealed unsafe class PipelinedPayload
{
    private readonly RpcConnection _connection;
    private readonly PipelineHeader* _header;
    private readonly long _length;
    private long _known;

    public PipelinedPayload(RpcConnection connection, byte* header, long length)
    {
        _connection = connection;
        _header = (PipelineHeader*)header;
        _length = length;
    }

    public long Length => _length;

    /// <summary>Bytes known to be in place right now (validated).</summary>
    public long Available()
    {
        long total = Volatile.Read(ref _header->Total);
        long ready = Volatile.Read(ref _header->BytesReady);
        if (total != _length || ready < _known || ready > _length)
        {
            var violation = new ProtocolViolationException($"Protocol violation by peer process {_connection.Peer.ProcessId}: a pipelined payload's progress went from {_known} to {ready} of {_length} (announced {total}).");
            _connection.Terminate(violation);
            throw violation;
        }

        _known = ready;
        return ready;
    }

    /// <summary>Waits until at least <paramref name="bytes"/> are in place; returns how many are (validated).</summary>
    public long WaitFor(long bytes, CancellationToken cancellationToken)
    {
        bytes = Math.Min(bytes, _length);
        long available = Available();
        if (available >= bytes)
        {
            return available;
        }

        var spinner = new SpinWait();
        long spinUntil = Stopwatch.GetTimestamp() + Stopwatch.Frequency / 20_000; // 50 us
        while (Stopwatch.GetTimestamp() < spinUntil)
        {
            available = Available();
            if (available >= bytes)
            {
                return available;
            }

            spinner.SpinOnce(sleep1Threshold: -1);
        }

        // A live sender that stops writing would otherwise park us forever: no progress for the stall
        // timeout (the arena wait timeout) ends the connection as a protocol violation.
        TimeSpan stall = _connection.StallTimeout;
        long stallTicks = stall == Timeout.InfiniteTimeSpan ? long.MaxValue : (long)(stall.TotalSeconds * Stopwatch.Frequency);
        long lastKnown = _known;
        long lastProgress = Stopwatch.GetTimestamp();
        while (true)
        {
            int chunks = Volatile.Read(ref _header->ChunksReady);
            Interlocked.Exchange(ref _header->ReceiverWaiting, 1);
            available = Available();
            if (available >= bytes)
            {
                return available;
            }

            _connection.ThrowIfClosed();
            cancellationToken.ThrowIfCancellationRequested();
            long now = Stopwatch.GetTimestamp();
            if (available != lastKnown)
            {
                lastKnown = available;
                lastProgress = now;
            }
            else if (now - lastProgress > stallTicks)
            {
                var violation = new ProtocolViolationException($"Protocol violation by peer process {_connection.Peer.ProcessId}: a pipelined payload stalled at {available} of {_length} bytes for {stall.TotalSeconds:0.#} s.");
                _connection.Terminate(violation);
                throw violation;
            }

            LinuxNative.FutexWait(&_header->ChunksReady, chunks, 50);
        }
    }
}

/// <summary>
/// A pipelined payload as a read-only stream: a read returns as soon as some bytes have landed, so the
/// reader works on chunk k while chunk k+1 is still being copied. Disposing it gives the block back.
/// </summary>
internal sealed unsafe class PipelinedPayloadStream : Stream
{
    private readonly PipelinedPayload _progress;
    private readonly byte* _data;
    private readonly SharedMemorySegment _segment;
    private readonly Action _release;
    private readonly CancellationToken _cancellationToken;
    private long _position;
    private int _disposed;

    /// <summary>Takes over a mapping reference on <paramref name="segment"/> (the received payload's), given back by Dispose.</summary>
    public PipelinedPayloadStream(PipelinedPayload progress, byte* data, SharedMemorySegment segment, Action release, CancellationToken cancellationToken)
    {
        Debug.Assert(segment.IsMapped, "the stream is handed a live mapping reference");
        _progress = progress;
        _data = data;
        _segment = segment;
        _release = release;
        _cancellationToken = cancellationToken;
    }

    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => false;

    public override long Length => _progress.Length;

    public override long Position
    {
        get => _position;
        set => throw new NotSupportedException();
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (buffer.IsEmpty || _position >= _progress.Length)
        {
            return 0;
        }

        // A Dispose on another thread may drop the stream's own mapping reference mid-read: hold one
        // for the read so the block cannot be unmapped under us. It is added while the stream's own is
        // held (or while the connection still owns the segment), which SafeHandle allows even after the
        // owner disposed; it fails only when a racing Dispose dropped the very last reference.
        ObjectDisposedException.ThrowIf(!_segment.TryAddReference(), this);

        try
        {
            long available = _progress.WaitFor(_position + 1, _cancellationToken) - _position;
            int count = (int)Math.Min(buffer.Length, available);
            new ReadOnlySpan<byte>(_data + _position, count).CopyTo(buffer);
            _position += count;
            return count;
        }
        finally
        {
            _segment.Release();
        }
    }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
        ValueTask.FromResult(Read(buffer.Span));

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        Task.FromResult(Read(buffer.AsSpan(offset, count)));

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

using System.Buffers;
using System.Diagnostics;
using System.Runtime.InteropServices;
using OffloadRpc.Engines;

namespace OffloadRpc.Transport;

/// <summary>What a sender hands over for one payload: bytes to copy into the arena, or a lease to move.</summary>
internal readonly struct OutboundPayload
{
    private OutboundPayload(ReadOnlyMemory<byte> data, SharedBuffer? lease, TransferMode mode, CachePolicy cache, bool transient = false, StreamSource? stream = null)
    {
        Data = data;
        Lease = lease;
        Mode = mode;
        Cache = cache;
        IsTransient = transient;
        Stream = stream;
    }

    /// <summary>A stream read straight into its pipelined block after the message is out (null: the bytes are <see cref="Data"/> or the lease).</summary>
    public StreamSource? Stream { get; }

    /// <summary>The bytes live in a buffer that goes back to a pool when the call returns: they must be copied before it does.</summary>
    public bool IsTransient { get; }

    public ReadOnlyMemory<byte> Data { get; }

    public SharedBuffer? Lease { get; }

    /// <summary>How the bytes are copied into shared memory (leases of this connection move without a copy).</summary>
    public TransferMode Mode { get; }

    public CachePolicy Cache { get; }

    public long Length => Stream?.Length ?? Lease?.Length ?? Data.Length;

    public static OutboundPayload Copy(ReadOnlyMemory<byte> data, TransferMode mode = TransferMode.Auto, CachePolicy cache = CachePolicy.Auto) => new(data, null, mode, cache);

    /// <summary>Bytes in a pooled buffer the caller takes back when the call returns (never copied asynchronously).</summary>
    public static OutboundPayload CopyTransient(ReadOnlyMemory<byte> data, TransferMode mode, CachePolicy cache) => new(data, null, mode, cache, transient: true);

    /// <summary>The next <see cref="StreamSource.Length"/> bytes of a stream, pipelined: read into shared memory as the receiver reads them out.</summary>
    public static OutboundPayload FromStream(StreamSource stream, CachePolicy cache) => new(default, null, TransferMode.Pipelined, cache, stream: stream);

    public static OutboundPayload Move(SharedBuffer lease) => new(default, lease ?? throw new ArgumentNullException(nameof(lease)), TransferMode.Auto, CachePolicy.Auto);
}

/// <summary>
/// One message on its way out, and everything it holds until it is published or given up: the arena
/// blocks it allocated (each with a mapping reference), the leases it detached (moved without a
/// copy), the leases of other connections it copied (disposed once it is out), the pins of buffers
/// the copy workers still read, and the pipelined copies that run after publishing.
/// <para>
/// Every send goes through it: build (<see cref="AddBody"/>, <see cref="Add"/>), then exactly one of
/// <see cref="Commit"/> (reserve a slot, mark the blocks lent, write, publish, then the pipelined
/// copies) or <see cref="Abandon"/> (free the blocks, reattach or dispose the leases, unpin). An
/// asynchronous offload hands the copies to the workers (<see cref="CommitWhenCopied"/>) and commits
/// from the thread pool. Pooled per thread (the synchronous path): a small call allocates nothing.
/// </para>
/// </summary>
internal sealed class OutboundMessage : IThreadPoolWorkItem
{
    private const int Max = TransportProtocol.MaxPayloadsPerMessage;

    [ThreadStatic]
    private static OutboundMessage? t_spare;

    private readonly PayloadRef[] _refs = new PayloadRef[Max];
    private readonly ArenaBlock[] _allocated = new ArenaBlock[Max];
    private readonly SharedBuffer?[] _detached = new SharedBuffer?[Max];
    private readonly SharedBuffer?[] _foreign = new SharedBuffer?[Max];
    private readonly MemoryHandle[] _pins = new MemoryHandle[Max];
    private readonly DeferredCopy[] _deferred = new DeferredCopy[Max];
    private CopyDescriptor[]? _copies; // the asynchronous offload path only
    private CopyCompletion? _completion;
    private byte[] _body = [];
    private int _bodyLength;
    private int _refCount;
    private int _allocatedCount;
    private int _detachedCount;
    private int _foreignCount;
    private int _pinCount;
    private int _deferredCount;
    private int _copyCount;
    private RpcConnection? _connection;
    private MessageKind _kind;
    private MessageFlags _flags;
    private ulong _callId;
    private int _methodId;
    private PendingCall? _call;
    private CancellationToken _callCancellation;
    private bool _handedToWorkers;

    private OutboundMessage()
    {
    }

    /// <summary>Blocks allocated and not yet given back (test view).</summary>
    internal int AllocatedCount => _allocatedCount;

    /// <summary>Buffers pinned for the copy workers (test view).</summary>
    internal int PinCount => _pinCount;

    /// <summary>Payloads still to be written after publishing (test view).</summary>
    internal int DeferredCount => _deferredCount;

    /// <summary>Copies waiting for the copy workers (test view).</summary>
    internal int AsyncCopyCount => _copyCount;

    /// <summary>
    /// A message of <paramref name="connection"/>, holding a reference on its outbound control area
    /// (the ring the message goes into) until it is committed or abandoned.
    /// </summary>
    public static OutboundMessage Begin(RpcConnection connection, MessageKind kind, ulong callId, int methodId, MessageFlags flags = MessageFlags.None)
    {
        if (!connection.OutboundArea.Segment.TryAddReference())
        {
            throw connection.ClosedException();
        }

        OutboundMessage message = t_spare ?? new OutboundMessage();
        t_spare = null;
        Debug.Assert(message._connection is null && message._refCount == 0, "a pooled message still holds a previous send");
        message._connection = connection;
        message._kind = kind;
        message._callId = callId;
        message._methodId = methodId;
        message._flags = flags;
        return message;
    }

    /// <summary>
    /// Puts the body in the arena when it does not fit the slot (it then counts as the first payload),
    /// and keeps a copy of an inline body when <paramref name="keepInlineCopy"/> (the message outlives the caller's span).
    /// </summary>
    public void AddBody(ReadOnlySpan<byte> body, bool inArena, bool keepInlineCopy, CancellationToken cancellationToken)
    {
        Debug.Assert(_refCount == 0, "the body goes first");
        if (inArena)
        {
            _flags |= MessageFlags.BodyInPayload;
            CopyIntoArena(body, default, null, TransferMode.Copy, CachePolicy.Auto, allowAsync: false, isTransient: true, cancellationToken);
            return;
        }

        if (keepInlineCopy)
        {
            if (_body.Length < body.Length)
            {
                _body = new byte[Math.Max(body.Length, 256)];
            }

            body.CopyTo(_body);
            _bodyLength = body.Length;
        }
    }

    /// <summary>
    /// Adds one payload: a lease of this connection moves (detached, no copy); anything else is
    /// copied into a new arena block, now, by the copy workers (<paramref name="allowAsync"/> and an
    /// explicitly offloaded array) or after publishing (pipelined).
    /// </summary>
    public void Add(in OutboundPayload payload, bool allowAsync, CancellationToken cancellationToken)
    {
        Debug.Assert(_refCount < Max, "the sender checks the payload count first");
        RpcConnection connection = _connection!;
        SharedBuffer? lease = payload.Lease;
        if (lease is not null && lease.Host == connection && lease.CanMove)
        {
            if (!lease.TryDetach())
            {
                throw new ObjectDisposedException(nameof(SharedBuffer), "A lease passed to a call was already disposed or passed on.");
            }

            _detached[_detachedCount++] = lease; // its mapping reference is the message's now
            _refs[_refCount++] = new PayloadRef
            {
                SegmentId = lease.Segment.Id,
                Flags = lease.IsOwnArena ? 0 : PayloadRef.ReceiverOwned,
                Offset = lease.Offset,
                Length = lease.Length,
            };
            return;
        }

        if (payload.Stream is { } stream)
        {
            AddStream(stream, cancellationToken);
            return;
        }

        CopyIntoArena(lease is null ? payload.Data.Span : lease.Span, payload.Data, lease, payload.Mode, payload.Cache, allowAsync, payload.IsTransient, cancellationToken);
        if (lease is not null)
        {
            _foreign[_foreignCount++] = lease; // copied (another connection's, or pipelined): it goes back once the message is out
        }
    }

    private unsafe void CopyIntoArena(ReadOnlySpan<byte> data, ReadOnlyMemory<byte> memory, SharedBuffer? lease, TransferMode mode, CachePolicy cache, bool allowAsync, bool isTransient, CancellationToken cancellationToken)
    {
        RpcConnection connection = _connection!;
        TransferPlan plan = TransferPolicy.Resolve(data.Length, mode, cache, connection.PipelineChunkBytes);
        bool pipelined = plan.Mode == TransferMode.Pipelined;
        long header = pipelined ? PipelineHeader.Size : 0;
        // An answer's payload on the poller (which serves every connection) must not wait for the peer to
        // release space: the call fails with ArenaExhaustedException at once instead.
        bool mayWait = _kind is not (MessageKind.Response or MessageKind.Fault) || !Poller.IsPollerThread;
        ArenaBlock block = connection.Arena.Allocate(header + data.Length, mayWait, cancellationToken);
        _allocated[_allocatedCount++] = block; // with the mapping reference the arena took for us
        SharedMemorySegment segment = block.Segment;
        if (pipelined)
        {
            // Written after the message is published, chunk by chunk (see WritePipelined).
            var progress = (PipelineHeader*)segment.Pointer(block.Offset, PipelineHeader.Size);
            *progress = new PipelineHeader { Total = data.Length };
            _deferred[_deferredCount++] = new DeferredCopy
            {
                Source = memory,
                SourceLease = lease,
                Block = block,
                Header = (nint)progress,
                Destination = (nint)(segment.Pointer(block.Offset, header + data.Length) + header),
                Bypass = plan.BypassCache,
            };
            _refs[_refCount++] = new PayloadRef { SegmentId = segment.Id, Flags = PayloadRef.Pipelined, Offset = block.Offset, Length = data.Length };
            return;
        }

        byte* destination = segment.Pointer(block.Offset, data.Length);
        _refs[_refCount++] = new PayloadRef { SegmentId = segment.Id, Offset = block.Offset, Length = data.Length };
        if (allowAsync && lease is null && IsAsyncOffload(memory, mode, isTransient, plan))
        {
            MemoryHandle pin = memory.Pin();
            _pins[_pinCount++] = pin;
            (_copies ??= new CopyDescriptor[Max])[_copyCount++] = CopyDescriptor.Create((nint)pin.Pointer, (nint)destination, (ulong)data.Length, plan.Cache);
            TransferMetrics.Record(plan, data.Length);
            return;
        }

        fixed (byte* source = data)
        {
            PayloadMover.Move(source, destination, data.Length, plan);
        }
    }

    /// <summary>A ring for a stream: published empty, then filled by the stream's pump straight from the stream.</summary>
    private unsafe void AddStream(StreamSource stream, CancellationToken cancellationToken)
    {
        RpcConnection connection = _connection!;
        long capacity = stream.RingBytes(connection);
        ArenaBlock block = connection.Arena.Allocate(PipelineHeader.Size + capacity, mayWait: !Poller.IsPollerThread, cancellationToken);
        _allocated[_allocatedCount++] = block;
        SharedMemorySegment segment = block.Segment;
        var progress = (PipelineHeader*)segment.Pointer(block.Offset, PipelineHeader.Size);
        *progress = new PipelineHeader { Total = -1, Announced = stream.Length }; // no end yet; the length if known
        _deferred[_deferredCount++] = new DeferredCopy
        {
            SourceStream = stream,
            Block = block,
            Header = (nint)progress,
            Destination = (nint)(segment.Pointer(block.Offset, PipelineHeader.Size + capacity) + PipelineHeader.Size),
            Capacity = capacity,
        };
        _refs[_refCount++] = new PayloadRef { SegmentId = segment.Id, Flags = PayloadRef.Pipelined | PayloadRef.Streamed | (stream.IsLengthKnown ? PayloadRef.LengthAnnounced : 0), Offset = block.Offset, Length = capacity };
    }

    /// <summary>Only a payload the caller explicitly offloaded, from an array it owns (pinnable for the duration), goes asynchronously.</summary>
    internal static bool IsAsyncOffload(ReadOnlyMemory<byte> data, TransferMode requested, bool isTransient, TransferPlan plan) =>
        requested == TransferMode.Offload && plan.Mode == TransferMode.Offload && !isTransient
        && data.Length >= CopyRoutines.NonTemporalThreshold && MemoryMarshal.TryGetArray(data, out ArraySegment<byte> _);

    /// <summary>
    /// Publishes the message: reserves a slot (waiting for room), marks the blocks lent, writes and
    /// publishes, then writes the pipelined payloads and lets go of what the message held. On a failure
    /// before publishing the message is abandoned (leases disposed with <paramref name="disposeLeasesOnFailure"/>) and the exception rethrown.
    /// The message is back in the pool when this returns.
    /// </summary>
    public unsafe void Commit(ReadOnlySpan<byte> inlineBody, CancellationToken cancellationToken, bool disposeLeasesOnFailure = false)
    {
        Debug.Assert(_pinCount == 0, "the copy workers' pins go before publishing");
        Debug.Assert(inlineBody.IsEmpty || (_flags & MessageFlags.BodyInPayload) == 0, "a body goes inline or in the arena, not both");
        RpcConnection connection = _connection!;
        try
        {
            byte* slot = connection.ReserveSlot(out long position, _kind, cancellationToken);

            // Past this point nothing fails short of the connection dying: mark our blocks lent
            // before the peer can see (and release) them.
            for (int i = 0; i < _refCount; i++)
            {
                ref PayloadRef reference = ref _refs[i];
                if ((reference.Flags & PayloadRef.ReceiverOwned) == 0)
                {
                    connection.Arena.MarkLent(reference.SegmentId, reference.Offset, stillWriting: (reference.Flags & PayloadRef.Pipelined) != 0);
                }
            }

            connection.WriteAndPublish(slot, position, _kind, _callId, _methodId, _flags, _refs.AsSpan(0, _refCount), inlineBody);
        }
        catch
        {
            Abandon(disposeLeasesOnFailure);
            throw;
        }

        // Published: the message is the peer's now. Only the pipelined bytes are still to be written.
        try
        {
            for (int d = 0; d < _deferredCount; d++)
            {
                ref DeferredCopy copy = ref _deferred[d];
                if (copy.SourceStream is { } stream)
                {
                    // Read straight from the stream into the block, asynchronously: the block keeps its mapping until then.
                    bool referenced = copy.Block.Segment.TryAddReference();
                    Debug.Assert(referenced, "the message holds a reference on its blocks until it is recycled");
                    stream.Start(connection, copy.Block, copy.Header, copy.Destination, copy.Capacity);
                    continue;
                }

                WritePipelined(connection, copy.SourceLease is { } lease ? lease.Span : copy.Source.Span, copy);
            }
        }
        finally
        {
            for (int i = 0; i < _allocatedCount; i++)
            {
                _allocated[i].Segment.Release();
            }

            for (int i = 0; i < _detachedCount; i++)
            {
                _detached[i]!.ReleaseDetachedMapping();
            }

            DisposeForeign();
            Recycle();
        }
    }

    /// <summary>Raises a pipelined block's progress to <paramref name="done"/> bytes and wakes a receiver waiting for it.</summary>
    internal static unsafe void PublishProgress(nint header, long done)
    {
        var progress = (PipelineHeader*)header;
        Volatile.Write(ref progress->BytesReady, done); // release: the bytes before it are in place
        Interlocked.Increment(ref progress->ChunksReady); // full fence before reading the waiter flag
        if (Volatile.Read(ref progress->ReceiverWaiting) != 0)
        {
            Interop.LinuxNative.FutexWake(&progress->ChunksReady, int.MaxValue);
        }
    }

    /// <summary>Marks a streamed payload's end at <paramref name="length"/> bytes (all of them published already) and wakes a receiver waiting for more.</summary>
    internal static unsafe void PublishEnd(nint header, long length)
    {
        Volatile.Write(ref ((PipelineHeader*)header)->Total, length); // after BytesReady reached it: the receiver sees the end of what is ready
        PublishProgress(header, length); // BytesReady is length already: this bumps the chunk count and wakes a waiter
    }

    /// <summary>Writes a pipelined payload chunk by chunk, publishing the progress after each so the receiver can start.</summary>
    private static unsafe void WritePipelined(RpcConnection connection, ReadOnlySpan<byte> data, in DeferredCopy copy)
    {
        fixed (byte* source = data)
        {
            long chunk = connection.PipelineChunkBytes;
            for (long done = 0; done < data.Length; done += chunk)
            {
                long length = Math.Min(chunk, data.Length - done);
                CopyRoutines.Copy(source + done, (byte*)copy.Destination + done, (nuint)length, copy.Bypass);
                PublishProgress(copy.Header, done + length);
            }
        }

        TransferMetrics.Record(new TransferPlan(TransferMode.Pipelined, copy.Bypass ? CachePolicy.Bypass : CachePolicy.Inject), data.Length);
        connection.Arena.FinishWriting(copy.Block.Segment.Id, copy.Block.Offset);
    }

    /// <summary>
    /// Hands the pinned copies to the copy workers; the worker that finishes the last one queues the
    /// commit to the thread pool (publishing may wait for a ring slot: never on a copy worker, they
    /// serve every connection). A failure then fails <paramref name="call"/>; its cancellation is armed once the request is out.
    /// </summary>
    public void CommitWhenCopied(PendingCall call, CancellationToken cancellationToken)
    {
        Debug.Assert(_copyCount > 0 && (_flags & MessageFlags.BodyInPayload) == 0 && _deferredCount == 0, "only inline-body requests with offloaded copies go asynchronously");
        _call = call;
        _callCancellation = cancellationToken;
        _handedToWorkers = true;
        CopyCompletion completion = _completion ??= new CopyCompletion();
        completion.OnCompleted(static s => ThreadPool.UnsafeQueueUserWorkItem((OutboundMessage)s!, preferLocal: false), this);
        WorkerCopyEngine.Shared.Submit(_copies.AsSpan(0, _copyCount), completion);
    }

    /// <summary>The thread-pool half of <see cref="CommitWhenCopied"/>: every byte is in place.</summary>
    void IThreadPoolWorkItem.Execute()
    {
        ReleasePins();
        PendingCall call = _call!;
        CancellationToken cancellationToken = _callCancellation;
        try
        {
            // The caller has gone on: on failure nothing it handed over is kept, and the call fails through its task.
            Commit(_body.AsSpan(0, _bodyLength), CancellationToken.None, disposeLeasesOnFailure: true);
        }
        catch (Exception ex)
        {
            call.FailOnClose(ex is OffloadRpcException ? ex : new PeerDisconnectedException("The request could not be sent: " + ex.Message, ex));
            return;
        }

        // Armed only now: a cancel sent before the request would reach the server first and be ignored.
        call.RegisterCancellation(cancellationToken);
    }

    /// <summary>
    /// The message will not be sent: unpins, frees the blocks it allocated, reattaches the leases it
    /// detached (and disposes every lease when <paramref name="disposeLeases"/>: nobody is left to own them). Never throws.
    /// </summary>
    public void Abandon(bool disposeLeases)
    {
        RpcConnection connection = _connection!;
        ReleasePins();
        for (int i = 0; i < _allocatedCount; i++)
        {
            ArenaBlock block = _allocated[i];
            try
            {
                connection.Arena.FreeLocal(block.Segment.Id, block.Offset);
            }
            catch (InvalidOperationException ex)
            {
                Debug.Fail("A block of an unsent message was not local: " + ex.Message);
            }
            finally
            {
                block.Segment.Release();
            }
        }

        for (int i = 0; i < _detachedCount; i++)
        {
            SharedBuffer lease = _detached[i]!;
            lease.Reattach();
            if (disposeLeases)
            {
                DisposeQuietly(lease);
            }
        }

        if (disposeLeases)
        {
            DisposeForeign();
        }

        Recycle();
    }

    private void ReleasePins()
    {
        for (int i = 0; i < _pinCount; i++)
        {
            _pins[i].Dispose();
            _pins[i] = default;
        }

        _pinCount = 0;
    }

    private void DisposeForeign()
    {
        for (int i = 0; i < _foreignCount; i++)
        {
            DisposeQuietly(_foreign[i]!);
        }
    }

    private static void DisposeQuietly(SharedBuffer lease)
    {
        try
        {
            lease.Dispose();
        }
        catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException or InvalidOperationException)
        {
        }
    }

    /// <summary>Drops every reference the send held (the control area's last) and returns the message to this thread's spare slot.</summary>
    private void Recycle()
    {
        Debug.Assert(_pinCount == 0, "a message is recycled with buffers still pinned");
        RpcConnection connection = _connection!;
        Array.Clear(_allocated, 0, _allocatedCount);
        Array.Clear(_detached, 0, _detachedCount);
        Array.Clear(_foreign, 0, _foreignCount);
        Array.Clear(_deferred, 0, _deferredCount);
        _refCount = _allocatedCount = _detachedCount = _foreignCount = _deferredCount = _copyCount = _bodyLength = 0;
        _connection = null;
        _call = null;
        _callCancellation = default;
        connection.OutboundArea.Segment.Release();

        // A message the copy workers had is not reused: the submitting thread may still be leaving
        // Submit (reading the descriptors) when the last copy completes and the message commits.
        if (!_handedToWorkers)
        {
            t_spare ??= this;
        }
    }

    /// <summary>A pipelined payload still to be written once its message is out.</summary>
    private struct DeferredCopy
    {
        public ReadOnlyMemory<byte> Source;
        public SharedBuffer? SourceLease;
        public StreamSource? SourceStream;

        /// <summary>The bytes of a stream's ring, after its header.</summary>
        public long Capacity;
        public ArenaBlock Block;
        public nint Header;
        public nint Destination;
        public bool Bypass;
    }
}

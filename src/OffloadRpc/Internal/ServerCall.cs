using System.ComponentModel;
using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// A call as the generated stub sees it: the MessagePack body, the payloads (memory that points into
/// shared memory, valid until the call completes), cancellation, and the reply.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class ServerCall
{
    private readonly IInboundCall _call;
    private List<SharedBuffer>? _leases;
    private List<SharedBuffer>? _moved;
    private List<Stream>? _streams;

    private readonly SerializerOptionsSource _serializerOptions;
    private bool _argumentsDecoded;

    internal ServerCall(IInboundCall call, MethodDescriptor method, SerializerOptionsSource serializerOptions)
    {
        _call = call;
        Method = method;
        _serializerOptions = serializerOptions;
    }

    /// <summary>The method being served.</summary>
    public MethodDescriptor Method { get; }

    /// <summary>The headers the caller sent (empty when none).</summary>
    internal IReadOnlyDictionary<string, string> RequestHeaders { get; set; } = CallMetadata.NoHeaders;

    /// <summary>The caller's deadline in this process's clock (UTC), or null.</summary>
    internal DateTime? Deadline { get; set; }

    /// <summary>The method's handler was entered (after the interceptors): only then is a failure before decoding the peer's.</summary>
    internal bool StubInvoked { get; private set; }

    /// <summary>Interceptors and logging of an observed call (null: none).</summary>
    internal ServerPipeline? Pipeline { get; set; }

    /// <summary>Makes the implementation of a service registered with a factory, once the interceptors ran (null: the stub's own).</summary>
    internal Func<ServerInterceptorContext, object>? ImplementationFactory { get; set; }

    private ServerInterceptorContext? _context;
    private object? _implementation;
    private Delegate? _handler;

    private OffloadCallContext? _callContext;

    /// <summary>The call as the method sees it (<see cref="OffloadCallContext.Current"/>): made on first use, the same object after.</summary>
    internal OffloadCallContext CallContext
    {
        get
        {
            OffloadCallContext? made = Volatile.Read(ref _callContext);
            if (made is not null)
            {
                return made;
            }

            Interlocked.CompareExchange(ref _callContext, new OffloadCallContext(this), null);
            return _callContext!;
        }
    }

    /// <summary>The call as interceptors and the implementation factory see it.</summary>
    internal ServerInterceptorContext Context => _context ??= new ServerInterceptorContext(this);

    /// <summary>
    /// Serves a method with one result (or <see cref="NoResult"/>): the interceptors around
    /// <paramref name="handler"/> (which decodes the arguments and calls the implementation), then the reply
    /// of the result they return, encoded by <paramref name="encode"/> (null: an empty reply).
    /// </summary>
    public ValueTask ServeAsync<TResult>(object? implementation, Func<ServerCall, ValueTask<TResult>> handler, Func<TResult, ServerCall, MessageBuilder>? encode)
    {
        ArgumentNullException.ThrowIfNull(handler);
        _implementation = implementation;
        _handler = handler;
        ValueTask<TResult> pending = Pipeline is { Interceptors.Length: > 0 } pipeline
            ? pipeline.Chain<TResult>()(Context)
            : RunHandler<TResult>();
        if (pending.IsCompletedSuccessfully)
        {
            Reply(encode is null ? MessageBuilder.Rent() : encode(pending.Result, this));
            return default;
        }

        return ReplyAfterAsync(pending, encode);
    }

    private async ValueTask ReplyAfterAsync<TResult>(ValueTask<TResult> pending, Func<TResult, ServerCall, MessageBuilder>? encode)
    {
        TResult result = await pending.ConfigureAwait(false);
        Reply(encode is null ? MessageBuilder.Rent() : encode(result, this));
    }

    /// <summary>
    /// Serves a method whose result is a stream: the interceptors around <paramref name="handler"/> (which
    /// decodes the arguments and calls the implementation), then the items of the stream they return, then
    /// the empty reply that ends it.
    /// </summary>
    public async ValueTask ServeStreamAsync<TItem>(object? implementation, Func<ServerCall, IAsyncEnumerable<TItem>> handler, StreamItemEncoder<TItem> encode)
    {
        ArgumentNullException.ThrowIfNull(handler);
        _implementation = implementation;
        _handler = handler;
        IAsyncEnumerable<TItem> items = Pipeline is { Interceptors.Length: > 0 } pipeline
            ? pipeline.StreamChain<TItem>()(Context)
            : RunStreamHandler<TItem>();
        await SendStreamAsync(items, encode).ConfigureAwait(false);
        Reply(MessageBuilder.Rent());
    }

    /// <summary>The innermost continuation: the method itself, once.</summary>
    internal ValueTask<TResult> RunHandler<TResult>()
    {
        EnterHandler();
        return ((Func<ServerCall, ValueTask<TResult>>)_handler!)(this);
    }

    /// <summary>The innermost continuation of a streamed result: the method's stream, once.</summary>
    internal IAsyncEnumerable<TItem> RunStreamHandler<TItem>()
    {
        EnterHandler();
        return ((Func<ServerCall, IAsyncEnumerable<TItem>>)_handler!)(this);
    }

    private void EnterHandler()
    {
        if (StubInvoked)
        {
            throw new InvalidOperationException($"A server interceptor continued {Method.FullName} twice: a call's continuation runs at most once.");
        }

        StubInvoked = true;
    }

    /// <summary>
    /// The implementation serving this call (generated handlers call this after decoding the arguments): the
    /// stub's own, or one made for this call by the factory it was registered with.
    /// </summary>
    public TService Implementation<TService>()
        where TService : class =>
        (TService)(_implementation ??= ImplementationFactory?.Invoke(Context) ?? throw new InvalidOperationException($"No implementation serves {Method.ServiceName}."));

    /// <summary>Completes with <see cref="NoResult"/> when the method without a result has (generated handlers of such methods return this).</summary>
    public static ValueTask<NoResult> Completion(ValueTask task) =>
        task.IsCompletedSuccessfully ? default : AwaitCompletion(task);

    private static async ValueTask<NoResult> AwaitCompletion(ValueTask task)
    {
        await task.ConfigureAwait(false);
        return default;
    }

    /// <summary>The options of the server the call came to (<see cref="OffloadRpcOptions.MessagePackResolver"/>).</summary>
    public MessagePackSerializerOptions SerializerOptions => _serializerOptions.Options;

    internal IInboundCall Inbound => _call;

    // _completed and _moved are guarded by a lock on the call itself: nothing else locks a ServerCall (only
    // generated stubs and this library hold one), and an object of its own would be an allocation per call.
    private bool _completed;

    /// <summary>
    /// Fires when the caller cancels or disconnects, or at the caller's deadline. Created on first use; asked
    /// for after the call completed (the pooled request behind it may already serve another call) it is a
    /// cancelled token. A token read during the call is the call's only while it runs: the request's source,
    /// when it never fired, serves the connection's next call.
    /// </summary>
    public CancellationToken CancellationToken
    {
        get
        {
            lock (this)
            {
                return _completed ? new CancellationToken(canceled: true) : _call.CancellationToken;
            }
        }
    }

    /// <summary>A reader over the MessagePack body.</summary>
    public MessagePackReader CreateReader() => new(_call.BodyMemory);

    /// <summary>Payload <paramref name="index"/> in place, in shared memory, until the call completes (-1: empty).</summary>
    public Memory<T> GetMemory<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return Memory<T>.Empty;
        }

        ValidatePayload(index);
        if (typeof(T) == typeof(byte) && _call.TryLendPayload(index, out Memory<byte> lent))
        {
            return System.Runtime.CompilerServices.Unsafe.As<Memory<byte>, Memory<T>>(ref lent); // the request's own memory, as long as the call runs
        }

        SharedBuffer lease = _call.TakePayload(index);
        (_leases ??= new List<SharedBuffer>(2)).Add(lease);
        return lease.CreateMemory<T>();
    }

    /// <summary>
    /// Payload <paramref name="index"/> as a new array (-1: null): the array the transport received it into
    /// (<see cref="MethodDescriptor.ArrayArgument"/>), otherwise copied out of the request's own memory
    /// or out of its lease.
    /// </summary>
    public T[]? CopyArray<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return null;
        }

        ValidatePayload(index);
        if (_call.TryTakeArray(index, out T[]? array))
        {
            return array;
        }

        return _call.TryLendPayload(index, out Memory<byte> lent) ? PayloadConversion.CopyOut<T>(lent.Span) : PayloadConversion.CopyOut<T>(_call.TakePayload(index));
    }

    /// <summary>
    /// Payload <paramref name="index"/> as a lease the implementation owns from now on (-1: null). If the
    /// call fails (its arguments do not decode, or the method throws) the lease goes back instead.
    /// </summary>
    public SharedBuffer? TakeSharedBuffer(int index)
    {
        if (index < 0)
        {
            return null;
        }

        SharedBuffer lease = Take(index);
        Moved(lease);
        return lease;
    }

    /// <summary>
    /// Payload <paramref name="index"/> as a read-only stream (-1: null). Reads return as bytes land:
    /// with a pipelined payload the method reads chunk k while later chunks are still being copied.
    /// The stream is closed when the call completes.
    /// </summary>
    public Stream? OpenStream(int index)
    {
        if (index < 0)
        {
            return null;
        }

        ValidatePayload(index);
        Stream stream = _call.OpenPayloadStream(index, _call.CancellationToken);
        (_streams ??= new List<Stream>(1)).Add(stream);
        return stream;
    }

    /// <summary>Payload <paramref name="index"/> as chunks, each handed over as soon as it has landed (-1: null).</summary>
    public IAsyncEnumerable<ReadOnlyMemory<byte>>? ReadChunks(int index) => OpenStream(index) is { } stream ? Chunks(stream) : null;

    private static async IAsyncEnumerable<ReadOnlyMemory<byte>> Chunks(Stream stream)
    {
        if (stream is Transport.IInPlaceReadable inPlace)
        {
            // In shared memory, as each chunk lands: no copy (valid until the next chunk is asked for).
            int most = (int)Math.Min(Engines.TransferPolicy.PipelineChunkBytes, int.MaxValue);
            while (true)
            {
                ReadOnlyMemory<byte> chunk = await inPlace.ReadInPlaceAsync(most, default).ConfigureAwait(false);
                if (chunk.IsEmpty)
                {
                    yield break;
                }

                yield return chunk;
            }
        }

        byte[] buffer = new byte[(int)Math.Min(Engines.TransferPolicy.PipelineChunkBytes, Math.Max(stream.Length, 1))];
        while (true)
        {
            int read = await stream.ReadAsync(buffer).ConfigureAwait(false);
            if (read == 0)
            {
                yield break;
            }

            yield return buffer.AsMemory(0, read); // valid until the next chunk is asked for
        }
    }

    /// <summary>
    /// Sends the items of a streamed result as the implementation produces them, each encoded by
    /// <paramref name="encode"/>, never more than the caller's window ahead of what it consumed: the
    /// producer is asked for the next item only when there is credit for it. Completes when the
    /// implementation's stream ends (the stub then replies, which ends the caller's enumeration); an
    /// exception from it fails the call (the caller's MoveNextAsync throws it). Items go out from the
    /// thread pool, never from the poller.
    /// </summary>
    public async ValueTask SendStreamAsync<T>(IAsyncEnumerable<T> items, StreamItemEncoder<T> encode)
    {
        ArgumentNullException.ThrowIfNull(items);
        ArgumentNullException.ThrowIfNull(encode);
        CancellationToken token = CancellationToken;
        Transport.StreamOutbox credit = _call.Outbox;
        IAsyncEnumerator<T> enumerator = items.GetAsyncEnumerator(token);
        try
        {
            while (true)
            {
                await credit.WaitAsync(token).ConfigureAwait(false);
                if (!await enumerator.MoveNextAsync().ConfigureAwait(false))
                {
                    break;
                }

                if (Transport.Poller.IsPollerThread)
                {
                    await Task.Yield(); // sending may wait for ring or arena space: never on the poller
                }

                MessageBuilder item = encode(enumerator.Current, SerializerOptions);
                if (item.HasDeferredPayloads)
                {
                    item.Discard();
                    throw new InvalidOperationException("A stream item cannot carry a stream or an async enumerable.");
                }

                try
                {
                    _call.SendStreamItem(item.WrittenBody, item.Payloads, token);
                }
                catch
                {
                    // The implementation gave the item's leases up by yielding them: if they cannot be sent, they go back.
                    foreach (OutboundPayload payload in item.Payloads)
                    {
                        payload.Lease?.Dispose();
                    }

                    throw;
                }
                finally
                {
                    item.Return();
                }
            }
        }
        finally
        {
            await enumerator.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The call's streamed argument (-1: null): its items as the client sends them, each decoded by
    /// <paramref name="decoder"/>; an item lent in place is valid until the next MoveNextAsync. Opening it
    /// grants the client this side's window. Ends when the client's enumerable ends; throws the client's
    /// exception as a <see cref="RemoteInvocationException"/>, and <see cref="OperationCanceledException"/>
    /// when the call is cancelled or the client dies. Given back when the call completes.
    /// </summary>
    public IAsyncEnumerable<T>? ReadItems<T>(int index, ReplyDecoder<T> decoder)
    {
        ArgumentNullException.ThrowIfNull(decoder);
        if (index < 0)
        {
            return null;
        }

        if (index != 0)
        {
            throw new ProtocolViolationException($"The request names streamed argument {index}; a call has at most one, numbered 0.");
        }

        IAsyncEnumerable<T> items = _call.ReadItems(decoder, _serializerOptions);
        if (typeof(T) == typeof(SharedBuffer))
        {
            // Each lease taken is the method's from then on, as a SharedBuffer argument is: if the method fails, they go back.
            return (IAsyncEnumerable<T>)(object)new MovedLeases((IAsyncEnumerable<SharedBuffer>)(object)items, this);
        }

        return items;
    }

    /// <summary>A lease the method took from its streamed argument: given back if the method fails.</summary>
    private void Moved(SharedBuffer lease)
    {
        lock (this)
        {
            if (!_completed)
            {
                List<SharedBuffer> moved = _moved ??= new List<SharedBuffer>(4);
                if (moved.Count == moved.Capacity)
                {
                    // A long streamed argument hands over a lease per item: the ones the method has disposed
                    // or sent on for good are nobody's to give back, so the list holds only what the method
                    // still has (a lease still being sent on may come back to it, so it stays). Growing when
                    // half is still held keeps this amortized O(1) for a method that holds many at once.
                    moved.RemoveAll(static held => held.IsGone);
                    if (moved.Count >= moved.Capacity / 2)
                    {
                        moved.Capacity *= 2;
                    }
                }

                moved.Add(lease);
                return;
            }
        }

        lease.Dispose(); // taken after the call completed (nothing should come then): nobody owns it
    }

    /// <summary>Leases noted as the method's that it may still hold (the ones a failure gives back).</summary>
    internal int MovedLeaseCount
    {
        get
        {
            lock (this)
            {
                return _moved?.Count ?? 0;
            }
        }
    }

    /// <summary>The leases of a streamed argument as the method takes them, each noted as moved to it.</summary>
    private sealed class MovedLeases(IAsyncEnumerable<SharedBuffer> items, ServerCall call) : IAsyncEnumerable<SharedBuffer>
    {
        public async IAsyncEnumerator<SharedBuffer> GetAsyncEnumerator(CancellationToken cancellationToken = default)
        {
            await using IAsyncEnumerator<SharedBuffer> inner = items.GetAsyncEnumerator(cancellationToken);
            while (await inner.MoveNextAsync().ConfigureAwait(false))
            {
                SharedBuffer lease = inner.Current;
                call.Moved(lease);
                yield return lease;
            }
        }
    }

    /// <summary>Sends the response built in <paramref name="response"/>.</summary>
    public void Reply(MessageBuilder response)
    {
        ArgumentNullException.ThrowIfNull(response);
        if (response.HasDeferredPayloads)
        {
            response.Discard();
            throw new InvalidOperationException("A response cannot carry a stream or an async enumerable argument.");
        }

        try
        {
            _call.Reply(response.WrittenBody, response.Payloads);
        }
        catch
        {
            // The method gave its result leases up by returning them: if they cannot be sent, they go back.
            foreach (OutboundPayload payload in response.Payloads)
            {
                payload.Lease?.Dispose();
            }

            throw;
        }
        finally
        {
            response.Return();
        }
    }

    private SharedBuffer Take(int index)
    {
        ValidatePayload(index);
        return _call.TakePayload(index);
    }

    private void ValidatePayload(int index)
    {
        if ((uint)index >= (uint)_call.PayloadCount)
        {
            throw new ProtocolViolationException($"The request names payload {index} but carries {_call.PayloadCount}.");
        }

        if (_call.IsPayloadTaken(index))
        {
            throw new ProtocolViolationException($"The request names payload {index} twice.");
        }
    }

    /// <summary>
    /// Generated code calls this once the arguments are decoded, before the implementation runs: a
    /// failure before it is the peer's (arguments that do not decode), after it the implementation's.
    /// </summary>
    public void ArgumentsDecoded() => _argumentsDecoded = true;

    /// <summary>Whether the arguments were decoded (see <see cref="ArgumentsDecoded"/>).</summary>
    internal bool HasDecodedArguments => _argumentsDecoded;

    /// <summary>The method has completed: the memory it was lent goes back, and on failure the leases it was given too.</summary>
    internal void Complete(bool faulted)
    {
        List<SharedBuffer>? moved;
        lock (this)
        {
            _completed = true;
            moved = _moved;
            _moved = null;
        }

        if (faulted && moved is not null)
        {
            foreach (SharedBuffer lease in moved)
            {
                lease.Dispose(); // no-op when the method already disposed or passed it on
            }
        }

        if (_streams is not null)
        {
            foreach (Stream stream in _streams)
            {
                stream.Dispose();
            }

            _streams = null;
        }
        if (_leases is not null)
        {
            foreach (SharedBuffer lease in _leases)
            {
                lease.Dispose();
            }

            _leases = null;
        }
    }
}

/// <summary>Encodes one item of a streamed result (generated per method).</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public delegate MessageBuilder StreamItemEncoder<T>(T item, MessagePackSerializerOptions options);

/// <summary>
/// A request as the server side of a transport delivers it to <see cref="ServerCall"/>: body, payloads
/// as leases or streams, cancellation, the caller, and the one way to answer.
/// </summary>
internal interface IInboundCall
{
    int MethodId { get; }

    ReadOnlyMemory<byte> BodyMemory { get; }

    int PayloadCount { get; }

    /// <summary>Fires when the caller cancels the call or disconnects.</summary>
    CancellationToken CancellationToken { get; }

    int PeerProcessId { get; }

    uint PeerUserId { get; }

    bool IsPayloadTaken(int index);

    SharedBuffer TakePayload(int index);

    /// <summary>
    /// Payload <paramref name="index"/> (in range, not taken) in the request's own memory until the call
    /// completes, without a lease: a transport whose request carries it in its message (gRPC's one frame).
    /// False: take it (<see cref="TakePayload"/>).
    /// </summary>
    bool TryLendPayload(int index, out Memory<byte> bytes)
    {
        bytes = default;
        return false;
    }

    /// <summary>
    /// Payload <paramref name="index"/> (in range, not taken) as the array of <typeparamref name="T"/> the
    /// transport received it into, now the caller's (<see cref="MethodDescriptor.ArrayArgument"/>). False:
    /// take it (<see cref="TakePayload"/>).
    /// </summary>
    bool TryTakeArray<T>(int index, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out T[]? array)
        where T : unmanaged
    {
        array = null;
        return false;
    }

    Stream OpenPayloadStream(int index, CancellationToken cancellationToken);

    /// <summary>Shared memory of the calling connection, to fill in place and return without a copy.</summary>
    SharedBuffer Rent(int bytes, CancellationToken cancellationToken);

    void Reply(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads);

    /// <summary>Credit for the items of the call's streamed result (a transport without streams has none).</summary>
    Transport.StreamOutbox Outbox => throw new NotSupportedException("This transport does not stream results.");

    /// <summary>Opens the call's streamed argument (the transport's window of items granted to the client).</summary>
    Transport.StreamInbox OpenInbox() => throw new NotSupportedException("This transport does not stream arguments.");

    /// <summary>The call's streamed argument as the method enumerates it (a transport with its own framing of items overrides this).</summary>
    IAsyncEnumerable<T> ReadItems<T>(ReplyDecoder<T> decoder, SerializerOptionsSource options) =>
        new ArgumentStream<T>(OpenInbox(), decoder, options, CancellationToken);

    /// <summary>Sends one item of the call's streamed result (waits for ring and arena space: not on the poller).</summary>
    void SendStreamItem(ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, CancellationToken cancellationToken) =>
        throw new NotSupportedException("This transport does not stream results.");

    /// <summary>The peer sent a call that does not decode: end its connection (the transport's promise for any protocol violation).</summary>
    void AbortConnection(ProtocolViolationException violation);

    /// <summary>Whether the request carried a metadata block (headers, deadline, trace context).</summary>
    bool HasMetadata => false;

    /// <summary>The request's metadata block (<see cref="CallMetadata"/>).</summary>
    ReadOnlyMemory<byte> Metadata => default;

    /// <summary>Bytes of every payload together.</summary>
    long PayloadBytes => 0;

    /// <summary>The call's token fires after <paramref name="delay"/> (the caller's deadline).</summary>
    void CancelAfter(TimeSpan delay)
    {
    }
}

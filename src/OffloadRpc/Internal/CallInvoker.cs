using System.Buffers;
using System.Buffers.Binary;
using System.ComponentModel;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// What a generated proxy calls: request out, reply in, payloads as leases. The proxy never sees the
/// transport; the shared-memory connection is one implementation, and a transport to another host
/// is another, without a change to the emitted code. Only this assembly can implement it.
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public abstract class CallInvoker
{
    private readonly SerializerOptionsSource _serializerOptions;

    private protected CallInvoker(SerializerOptionsSource serializerOptions) => _serializerOptions = serializerOptions;

    /// <summary>The options, not yet built: code that may never need them passes this on (see <see cref="Internal.SerializerOptionsSource"/>).</summary>
    private protected SerializerOptionsSource SerializerOptionsSource => _serializerOptions;

    /// <summary>The options generated code serializes MessagePack arguments with (per connection: <see cref="OffloadRpcOptions.MessagePackResolver"/>).</summary>
    public MessagePackSerializerOptions SerializerOptions => _serializerOptions.Options;

    /// <summary>Interceptors, default deadline and logging of the connection (null: none of them).</summary>
    internal ClientPipeline? Pipeline { get; set; }

    /// <summary>
    /// Whether a call takes the observed path: interceptors, headers, a deadline, a trace context to carry,
    /// or a listener for spans or call metrics. Otherwise (the common case) nothing is allocated for them.
    /// </summary>
    private bool IsObserved => !IsReady || Pipeline is not null || OffloadCallScope.Current is not null || Activity.Current is not null || Telemetry.ClientObserved;

    /// <summary>Calls <paramref name="method"/>, which has no result. Takes <paramref name="request"/> over, whatever happens.</summary>
    public ValueTask InvokeAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        if (IsObserved)
        {
            return InvokeObservedVoidAsync(method, request, cancellationToken);
        }

        return request.HasDeferredPayloads
            ? GatherThenAwaitAsync(method, request, cancellationToken)
            : InvokeLeanAsync(method, request, cancellationToken);
    }

    /// <summary><see cref="InvokeLeanAsync{T}"/> of a method without a result: sends and awaits the reply.</summary>
    internal virtual ValueTask InvokeLeanAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        AwaitAsync(Send(method, request, cancellationToken));

    /// <summary>Calls <paramref name="method"/> and decodes its result. Takes <paramref name="request"/> over, whatever happens.</summary>
    public ValueTask<T> InvokeAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        if (IsObserved)
        {
            return InvokeObservedAsync<T>(method, request, cancellationToken);
        }

        return request.HasDeferredPayloads
            ? GatherThenAwaitAsync(method, request, cancellationToken)
            : InvokeLeanAsync(method, request, cancellationToken);
    }

    /// <summary>
    /// A call with nothing around it (no interceptors, metadata or telemetry) and no stream to gather:
    /// sends, awaits the reply and decodes it. A transport overrides it to do all of that in one async
    /// step where it can (a gRPC unary call), which saves a state machine and a reply object per call.
    /// Takes <paramref name="request"/> over, whatever happens.
    /// </summary>
    internal virtual ValueTask<T> InvokeLeanAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
        AwaitAsync(Send(method, request, cancellationToken), method.Decoder);

    /// <summary>
    /// False while the invoker cannot send yet (a managed connection that is connecting or reconnecting):
    /// calls then await <see cref="WhenReadyAsync"/> first, holding their request.
    /// </summary>
    internal virtual bool IsReady => true;

    /// <summary>Completes when the invoker can send (connects, if it has to); fails when it cannot.</summary>
    internal virtual ValueTask WhenReadyAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask InvokeObservedVoidAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        await InvokeObservedAsync<NoResult>(method, request, cancellationToken).ConfigureAwait(false);

    /// <summary>The call's deadline: the scope's, else the options' default from now, else none.</summary>
    private static DateTime? DeadlineOf(OffloadCallScope? scope, ClientPipeline? pipeline)
    {
        if (scope?.Deadline is { } deadline)
        {
            return deadline;
        }

        if (pipeline?.DefaultDeadline is { } timeout)
        {
            DateTime now = DateTime.UtcNow;
            return timeout >= DateTime.MaxValue - now ? DateTime.MaxValue : now + timeout;
        }

        return null;
    }

    /// <summary>
    /// A call with interceptors, metadata or telemetry: span and metrics around the interceptors, metadata
    /// written last. Its state machine (and <see cref="SendObservedAsync"/>'s) is pooled: a box per call was
    /// most of what an observed call allocated.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<T> InvokeObservedAsync<T>(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ClientPipeline? pipeline = Pipeline;
        OffloadCallScope? scope = OffloadCallScope.Current;
        if (!IsReady)
        {
            try
            {
                await WhenReadyAsync(cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                request.Discard();
                throw;
            }
        }

        var context = new ClientInterceptorContext(this, method, request, scope, DeadlineOf(scope, pipeline), cancellationToken);
        CallObservation observation = CallObservation.Start(Telemetry.Client, method);
        Exception? failure = null;
        try
        {
            return pipeline is { Interceptors.Length: > 0 }
                ? await pipeline.Chain<T>()(context).ConfigureAwait(false)
                : await SendObservedAsync<T>(context).ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            failure = ex;
            throw;
        }
        finally
        {
            context.DiscardUnsentRequest();
            observation.Stop(Telemetry.StatusOf(failure), failure, pipeline);
        }
    }

    /// <summary>The call itself, after the interceptors: deadline armed, metadata (headers, deadline, trace context) written before the body.</summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    internal async ValueTask<T> SendObservedAsync<T>(ClientInterceptorContext context)
    {
        MethodDescriptor method = context.Method;
        MessageBuilder request = context.TakeRequest();
        DeadlineTimer timer = default;
        try
        {
            CancellationToken token = timer.Arm(context, request, context.CancellationToken);
            if (request.HasDeferredPayloads)
            {
                try
                {
                    await request.GatherAsync(token).ConfigureAwait(false);
                }
                catch
                {
                    request.Discard();
                    throw;
                }
            }

            OutgoingMetadata metadata = OutgoingMetadata.Of(context);
            ValueTask<RpcReply> pending;
            if (metadata.IsEmpty)
            {
                pending = Send(method, request, token);
            }
            else
            {
                try
                {
                    pending = SendAsync(method, request, metadata, token);
                }
                catch (Exception exception)
                {
                    pending = ValueTask.FromException<RpcReply>(exception);
                }
                finally
                {
                    request.Return();
                }
            }

            using RpcReply reply = await pending.ConfigureAwait(false);
            return method is MethodDescriptor<T> typed ? Decode(typed.Decoder, reply) : default!;
        }
        catch (Exception ex) when (timer.Exceeded(context, ex) is { } exceeded)
        {
            throw exceeded;
        }
        finally
        {
            timer.Dispose();
        }
    }

    /// <summary>
    /// Sends the request with its metadata (headers, deadline, trace context). Each transport that carries
    /// metadata writes it its own way (in the ring message, as a gRPC header); one that carries none drops it (the default).
    /// </summary>
    internal virtual ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, CancellationToken cancellationToken) =>
        SendAsync(method, request, cancellationToken);

    /// <summary>
    /// Calls <paramref name="method"/>, whose result is a stream of items, each decoded by the method's
    /// decoder. Nothing is sent until the stream is enumerated (once); breaking out of the enumeration or
    /// cancelling either token cancels the call on the server. Takes <paramref name="request"/> over, whatever happens.
    /// </summary>
    public IAsyncEnumerable<T> InvokeStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(method);
        ArgumentNullException.ThrowIfNull(request);
        ClientPipeline? pipeline = Pipeline;
        OffloadCallScope? scope = OffloadCallScope.Current;
        return pipeline is null && scope is null && Activity.Current is null && !Telemetry.ClientObserved
            ? CreateServerStream(method, request, cancellationToken)
            : ObserveStreamAsync(method, request, pipeline, scope, cancellationToken);
    }

    /// <summary>
    /// A streamed call with interceptors, metadata or telemetry: when the enumeration starts, the span and
    /// metrics begin, the interceptors' <see cref="ClientInterceptor.InterceptStream"/> run, and the request
    /// goes with its metadata; they end with the stream (status "cancelled" when the consumer leaves early).
    /// </summary>
    private async IAsyncEnumerable<T> ObserveStreamAsync<T>(MethodDescriptor<T> method, MessageBuilder request, ClientPipeline? pipeline, OffloadCallScope? scope, CancellationToken cancellationToken, [EnumeratorCancellation] CancellationToken enumeratorToken = default)
    {
        // The consumer's token (WithCancellation) cancels the call whatever the interceptors pass on.
        using CancellationTokenSource? linked = enumeratorToken.CanBeCanceled && enumeratorToken != cancellationToken
            ? CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, enumeratorToken)
            : null;
        var context = new ClientInterceptorContext(this, method, request, scope, DeadlineOf(scope, pipeline), linked?.Token ?? cancellationToken);
        CallObservation observation = CallObservation.Start(Telemetry.Client, method);
        IAsyncEnumerator<T>? items = null;
        Exception? failure = null;
        bool ended = false;
        try
        {
            while (true)
            {
                try
                {
                    items ??= (pipeline is { Interceptors.Length: > 0 } ? pipeline.StreamChain<T>()(context) : OpenObservedStream<T>(context)).GetAsyncEnumerator(enumeratorToken);
                    ended = !await items.MoveNextAsync().ConfigureAwait(false);
                }
                catch (Exception ex)
                {
                    failure = ex;
                    throw;
                }

                if (ended)
                {
                    break;
                }

                yield return items.Current;
            }
        }
        finally
        {
            context.DiscardUnsentRequest();
            try
            {
                if (items is not null)
                {
                    await items.DisposeAsync().ConfigureAwait(false);
                }
            }
            finally
            {
                observation.Stop(failure is not null ? Telemetry.StatusOf(failure) : ended ? "ok" : "cancelled", failure, pipeline);
            }
        }
    }

    /// <summary>The streamed call itself, after the interceptors (the innermost continuation of <see cref="ClientInterceptor.InterceptStream"/>).</summary>
    internal IAsyncEnumerable<T> OpenObservedStream<T>(ClientInterceptorContext context) =>
        CreateObservedServerStream((MethodDescriptor<T>)context.Method, context);

    /// <summary>The enumerable of a streamed result (a transport that streams differently makes its own).</summary>
    internal virtual IAsyncEnumerable<T> CreateServerStream<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken) =>
        new ServerStreamCall<T>(this, method, request, null, cancellationToken);

    /// <summary>
    /// The enumerable of a streamed result carrying the context's headers, deadline and trace context. A
    /// transport without metadata streams drops them (the default).
    /// </summary>
    internal virtual IAsyncEnumerable<T> CreateObservedServerStream<T>(MethodDescriptor<T> method, ClientInterceptorContext context) =>
        CreateServerStream(method, context.TakeRequest(), context.CancellationToken);

    /// <summary>A stream whose request could not be encoded: its enumeration throws <paramref name="exception"/>.</summary>
    public static IAsyncEnumerable<T> FailedStream<T>(Exception exception)
    {
        ArgumentNullException.ThrowIfNull(exception);
        return Throw(exception);

        static async IAsyncEnumerable<T> Throw(Exception exception)
        {
            await Task.CompletedTask.ConfigureAwait(false);
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(exception);
            yield break;
        }
    }

    /// <summary>
    /// Sends the request of a streaming call: its items go to the returned inbox as they arrive, and the
    /// reply ends the stream. Takes <paramref name="request"/> over (after its deferred payloads were gathered).
    /// </summary>
    internal virtual ValueTask<RpcReply> SendStreamingAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, out StreamInbox inbox, CancellationToken cancellationToken)
    {
        request.Discard();
        throw new NotSupportedException($"This transport does not stream results ({method.FullName}).");
    }

    /// <summary>Decodes a stream item with the method's decoder (a failure is the peer's protocol violation).</summary>
    internal T DecodeItem<T>(ReplyDecoder<T> decoder, RpcReply item) => Decode(decoder, item);

    /// <summary>
    /// Sends the request. Before it returns, everything the request holds has been copied or moved
    /// (the builder is reused at once); the reply arrives through the returned task.
    /// </summary>
    internal abstract ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken);

    private ValueTask<RpcReply> Send(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        try
        {
            return SendAsync(method, request, cancellationToken);
        }
        catch (Exception exception)
        {
            return ValueTask.FromException<RpcReply>(exception); // a failed call is a failed task, never a throw from the proxy
        }
        finally
        {
            request.Return();
        }
    }

    /// <summary>Stream and async-enumerable arguments are read asynchronously first; then the request goes as any other.</summary>
    private async ValueTask<RpcReply> GatherThenSendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        using var streamFailed = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        StreamSource[]? sources;
        try
        {
            sources = await request.GatherAsync(streamFailed.Token, pipelineStreams: SendsStreamsAsRead).ConfigureAwait(false);
        }
        catch
        {
            request.Discard();
            throw;
        }

        if (sources is null)
        {
            return await Send(method, request, cancellationToken).ConfigureAwait(false);
        }

        // Stream arguments are read into shared memory while the server reads them out. One that fails
        // (its reads throw, or it ends early) cancels the call: the server would otherwise wait for bytes that never come.
        foreach (StreamSource source in sources)
        {
            _ = source.Completion.ContinueWith(static (task, state) => ((CancellationTokenSource)state!).Cancel(), streamFailed, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }

        RpcReply reply;
        try
        {
            reply = await Send(method, request, streamFailed.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested && Array.Find(sources, s => s.Completion.IsFaulted) is { } failed)
        {
            await failed.Completion.ConfigureAwait(false); // throws the stream's own exception
            throw;
        }
        catch
        {
            streamFailed.Cancel(); // the call failed: stop reading the streams before the token goes
            throw;
        }

        // The server may answer before it read everything: it reads no more, so a stream still being read is
        // stopped (its pending read cancelled: a pipe gone quiet would otherwise hold the answer back until it
        // spoke again). The call returns once no read of the caller's streams is running, so the caller may
        // dispose them. Only a stream that failed before the answer fails the call.
        bool stopped = false;
        if (Array.Exists(sources, static s => !s.Completion.IsCompleted))
        {
            stopped = true;
            streamFailed.Cancel();
        }

        try
        {
            foreach (StreamSource source in sources)
            {
                try
                {
                    await source.Completion.ConfigureAwait(false);
                }
                catch (Exception) when (stopped && !cancellationToken.IsCancellationRequested)
                {
                    // Stopped by us after the answer (a cancelled read, or a stream that throws its own error when cancelled).
                }
            }
        }
        catch
        {
            reply.Dispose();
            throw;
        }

        return reply;
    }

    /// <summary>Whether this transport reads a seekable Stream argument straight into the request as it goes (the shared-memory one does).</summary>
    private protected virtual bool SendsStreamsAsRead => false;

    private async ValueTask GatherThenAwaitAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken)
    {
        using RpcReply reply = await GatherThenSendAsync(method, request, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask<T> GatherThenAwaitAsync<T>(MethodDescriptor<T> method, MessageBuilder request, CancellationToken cancellationToken)
    {
        using RpcReply reply = await GatherThenSendAsync(method, request, cancellationToken).ConfigureAwait(false);
        return Decode(method.Decoder, reply);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private static async ValueTask AwaitAsync(ValueTask<RpcReply> pending)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<T> AwaitAsync<T>(ValueTask<RpcReply> pending, ReplyDecoder<T> decoder)
    {
        using RpcReply reply = await pending.ConfigureAwait(false);
        return Decode(decoder, reply);
    }

    /// <summary>A reply that does not decode is the peer's protocol violation: its connection ends, and the caller gets that.</summary>
    internal T Decode<T>(ReplyDecoder<T> decoder, RpcReply reply)
    {
        try
        {
            return decoder(new CallReply(reply, _serializerOptions));
        }
        catch (Exception ex) when (ex is not (ObjectDisposedException or OperationCanceledException or OutOfMemoryException))
        {
            var violation = ex as ProtocolViolationException ?? new ProtocolViolationException("A reply does not decode: " + ex.Message, ex);
            reply.AbortConnection(violation);
            throw violation;
        }
    }
}

/// <summary>The invoker of a shared-memory connection: the request's body and payloads go through the connection's rings and arena.</summary>
internal sealed class SharedMemoryInvoker : CallInvoker
{
    private readonly RpcConnection _connection;

    public SharedMemoryInvoker(RpcConnection connection, SerializerOptionsSource serializerOptions)
        : base(serializerOptions) => _connection = connection;

    private protected override bool SendsStreamsAsRead => true;

    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, CancellationToken cancellationToken) =>
        Call(method, request, default, null, cancellationToken);

    /// <summary>A call with a streamed argument: the request, then its items under the server's credit while the reply is awaited.</summary>
    private ValueTask<RpcReply> CallWithItems(MethodDescriptor method, ReadOnlySpan<byte> body, ReadOnlySpan<OutboundPayload> payloads, MessageFlags flags, StreamInbox? inbox, ItemStream items, CancellationToken cancellationToken)
    {
        var outbox = new StreamOutbox();
        return items.SendWhileAwaitingAsync(_connection.CallAsync(method.Id, body, payloads, flags, inbox, outbox, cancellationToken), outbox, SerializerOptionsSource, cancellationToken);
    }

    internal override ValueTask<RpcReply> SendStreamingAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, out StreamInbox inbox, CancellationToken cancellationToken)
    {
        inbox = new StreamInbox(_connection, _connection.StreamWindow, _connection.RunContinuationsAsynchronously); // resumes as a unary awaiter does
        try
        {
            return Call(method, request, metadata, inbox, cancellationToken);
        }
        catch (Exception exception)
        {
            return ValueTask.FromException<RpcReply>(exception);
        }
        finally
        {
            request.Return();
        }
    }

    /// <summary>An observed streamed result: its request carries the context's metadata, its deadline is this side's too.</summary>
    internal override IAsyncEnumerable<T> CreateObservedServerStream<T>(MethodDescriptor<T> method, ClientInterceptorContext context) =>
        new ServerStreamCall<T>(this, method, context.TakeRequest(), context, context.CancellationToken);

    /// <summary>
    /// The body becomes [u32 length][metadata][arguments], flagged <see cref="MessageFlags.HasMetadata"/>: the
    /// block is encoded in place in the builder's framing buffer, then the arguments follow it (one copy, no allocation).
    /// </summary>
    internal override ValueTask<RpcReply> SendAsync(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, CancellationToken cancellationToken) =>
        Call(method, request, metadata, null, cancellationToken);

    private ValueTask<RpcReply> Call(MethodDescriptor method, MessageBuilder request, in OutgoingMetadata metadata, StreamInbox? inbox, CancellationToken cancellationToken)
    {
        MessageFlags flags = metadata.IsEmpty ? MessageFlags.None : MessageFlags.HasMetadata;
        ReadOnlySpan<byte> body = metadata.IsEmpty ? request.WrittenBody : request.FrameWithMetadata(metadata);
        return request.TakeItemStream() is { } items
            ? CallWithItems(method, body, request.Payloads, flags, inbox, items, cancellationToken)
            : _connection.CallAsync(method.Id, body, request.Payloads, flags, inbox, null, cancellationToken);
    }
}

/// <summary>What a connection's options add to every call: interceptors, a default deadline, logging of slow calls.</summary>
internal sealed class ClientPipeline : CallLogging
{
    public ClientPipeline(ClientInterceptor[] interceptors, TimeSpan? defaultDeadline, Microsoft.Extensions.Logging.ILogger logger, TimeSpan slowCallThreshold)
        : base(logger, slowCallThreshold)
    {
        Interceptors = interceptors;
        DefaultDeadline = defaultDeadline;
    }

    public ClientInterceptor[] Interceptors { get; }

    public TimeSpan? DefaultDeadline { get; }

    /// <summary>This pipeline's chains (a test hook reads how many were built).</summary>
    internal InterceptorChainCache Chains { get; } = new();

    /// <summary>The interceptors around a call with one result (built once per result type).</summary>
    public ClientCallContinuation<T> Chain<T>() =>
        Chains.Get<ClientInterceptor, ClientCallContinuation<T>>(Interceptors, static context => context.Invoker.SendObservedAsync<T>(context), static (interceptor, next) => context => interceptor.InterceptAsync(context, next));

    /// <summary>The interceptors around a call whose result is a stream (built once per item type).</summary>
    public ClientStreamContinuation<T> StreamChain<T>() =>
        Chains.Get<ClientInterceptor, ClientStreamContinuation<T>>(Interceptors, static context => context.Invoker.OpenObservedStream<T>(context), static (interceptor, next) => context => interceptor.InterceptStream(context, next));

    /// <summary>The pipeline of <paramref name="options"/>, or null when they add nothing to a call.</summary>
    public static ClientPipeline? From(OffloadRpcOptions options, IEnumerable<ClientInterceptor>? extra = null)
    {
        ClientInterceptor[] interceptors = [.. options.ClientInterceptors, .. extra ?? []];
        if (interceptors.Length == 0 && options.DefaultDeadline is null && options.LoggerFactory is null)
        {
            return null;
        }

        return new ClientPipeline(interceptors, options.DefaultDeadline, options.CreateLogger(), options.SlowCallThreshold);
    }
}

/// <summary>
/// One method of a service contract, created once per method by generated code: its names and
/// stable id, for routing, telemetry and other transports (<see cref="FullName"/> is gRPC's form).
/// </summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public class MethodDescriptor
{
    public MethodDescriptor(string serviceName, string name, int id)
    {
        ArgumentException.ThrowIfNullOrEmpty(serviceName);
        ArgumentException.ThrowIfNullOrEmpty(name);
        ServiceName = serviceName;
        Name = name;
        Id = id;
        FullName = "/" + serviceName + "/" + name;
        SpanName = FullName[1..];
    }

    /// <summary><c>ServiceName/Name</c>: the name of the method's spans (made once, not per call).</summary>
    internal string SpanName { get; }

    /// <summary>The service interface's full name.</summary>
    public string ServiceName { get; }

    /// <summary>The method's name as declared.</summary>
    public string Name { get; }

    /// <summary>The method's stable id (a hash of its signature; both sides compute it).</summary>
    public int Id { get; }

    /// <summary><c>/ServiceName/Name</c>.</summary>
    public string FullName { get; }

    /// <summary>Whether the method returns a value (a reply with a body to decode).</summary>
    internal virtual bool HasResult => false;

    /// <summary>
    /// Makes the array a reply's one buffer is received into when the result is a <c>T[]</c> of a primitive
    /// type sent as a buffer (a transport that copies replies into this process fills it in place); null otherwise.
    /// </summary>
    internal virtual ArrayReceiver? ResultArray => null;

    /// <summary>
    /// The type of the method's one buffer argument when it is an array (<c>float[]</c>, say) and the method
    /// has no other buffer argument; null otherwise (set by generated code). A transport that copies a
    /// request's bytes into this process (gRPC) receives that argument straight into its array, which the
    /// stub then hands to the implementation as it is, instead of copying it out of a lease.
    /// </summary>
    public Type? ArrayArgument
    {
        get;
        init
        {
            field = value;
            ArgumentArray = ArrayReceiver.ForArray(value);
        }
    }

    /// <summary>Makes the array of <see cref="ArrayArgument"/> when it is one of a primitive element type; null otherwise (the argument keeps its lease).</summary>
    internal ArrayReceiver? ArgumentArray { get; private init; }

    /// <summary>
    /// What the method's request and reply can carry besides MessagePack, as the generator saw its
    /// signature (<see cref="MethodShape.Unknown"/> when not told: assume buffers and streams both ways).
    /// A transport that frames messages (gRPC) binds a method that carries neither as a unary call.
    /// </summary>
    public MethodShape Shape { get; init; }

    /// <summary>
    /// What a framing transport made of this method (the gRPC transport's method objects), made on first
    /// use and kept: it depends on the method alone, so every connection shares it, without a lookup per call.
    /// </summary>
    internal object? TransportMethod;

    public override string ToString() => FullName;
}

/// <summary>What a method's request and reply carry besides their MessagePack body (generated per method).</summary>
[Flags]
[EditorBrowsable(EditorBrowsableState.Never)]
public enum MethodShape
{
    /// <summary>Not described: a transport assumes buffers and streams both ways.</summary>
    Unknown = 0,

    /// <summary>Described: what the other flags do not name, the method does not carry.</summary>
    Described = 1,

    /// <summary>An argument crosses as a buffer (ReadOnlyMemory&lt;T&gt;, Memory&lt;T&gt;, T[], SharedBuffer, Stream).</summary>
    BufferArguments = 2,

    /// <summary>The result crosses as a buffer.</summary>
    BufferResult = 4,

    /// <summary>An argument is a stream of items (IAsyncEnumerable&lt;T&gt;).</summary>
    StreamedArgument = 8,

    /// <summary>The result is a stream of items (IAsyncEnumerable&lt;T&gt;).</summary>
    StreamedResult = 16,
}

/// <summary>A method with a result, and the generated code that decodes it from a reply.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public sealed class MethodDescriptor<TResult> : MethodDescriptor
{
    public MethodDescriptor(string serviceName, string name, int id, ReplyDecoder<TResult> decoder)
        : base(serviceName, name, id) => Decoder = decoder ?? throw new ArgumentNullException(nameof(decoder));

    /// <summary>Decodes the reply into the result.</summary>
    public ReplyDecoder<TResult> Decoder { get; }

    internal override bool HasResult => true;

    /// <summary>Only for a buffer result, not a stream: the reply's one payload is then the array.</summary>
    internal override ArrayReceiver? ResultArray =>
        (Shape & (MethodShape.Described | MethodShape.BufferResult | MethodShape.StreamedResult)) == (MethodShape.Described | MethodShape.BufferResult) ? ArrayReceiver.For<TResult>() : null;
}

/// <summary>Decodes a reply into the method's return value (generated per method).</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public delegate T ReplyDecoder<T>(in CallReply reply);

/// <summary>A reply as the generated decoder sees it: the MessagePack body and the payloads.</summary>
[EditorBrowsable(EditorBrowsableState.Never)]
public readonly struct CallReply
{
    private readonly RpcReply _reply;

    private readonly SerializerOptionsSource _serializerOptions;

    internal CallReply(RpcReply reply, SerializerOptionsSource serializerOptions)
    {
        _reply = reply;
        _serializerOptions = serializerOptions;
    }

    /// <summary>The options of the connection the reply came on.</summary>
    public MessagePackSerializerOptions SerializerOptions => _serializerOptions.Options;

    /// <summary>A reader over the MessagePack body.</summary>
    public MessagePackReader CreateReader() => new(_reply.BodyMemory);

    /// <summary>
    /// Copies payload <paramref name="index"/> out of shared memory into a new array (-1: null); a transport
    /// that received it straight into the array (gRPC, <see cref="ArrayReceiver"/>) gives that array as it is.
    /// </summary>
    public T[]? CopyArray<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return null;
        }

        return _reply.TryTakeArray(index, out T[]? received) ? received : PayloadConversion.CopyOut<T>(Take(index));
    }

    /// <summary>Takes payload <paramref name="index"/> as a lease the caller owns (-1: null).</summary>
    public SharedBuffer? TakeSharedBuffer(int index) => index < 0 ? null : Take(index);

    /// <summary>
    /// Payload <paramref name="index"/> in place, in shared memory (-1: empty). Only a stream item lends
    /// its payloads: the memory stays valid until the consumer asks for the next item.
    /// </summary>
    public Memory<T> GetMemory<T>(int index)
        where T : unmanaged
    {
        if (index < 0)
        {
            return Memory<T>.Empty;
        }

        if ((uint)index >= (uint)_reply.PayloadCount)
        {
            throw new ProtocolViolationException($"The reply names payload {index} but carries {_reply.PayloadCount}.");
        }

        return _reply.LendPayload(index).CreateMemory<T>();
    }

    private SharedBuffer Take(int index)
    {
        if ((uint)index >= (uint)_reply.PayloadCount)
        {
            throw new ProtocolViolationException($"The reply names payload {index} but carries {_reply.PayloadCount}.");
        }

        return _reply.TakePayload(index);
    }
}

internal static class PayloadConversion
{
    /// <summary>Copies a lease's bytes into a new array of <typeparamref name="T"/> and gives the lease back.</summary>
    public static T[] CopyOut<T>(SharedBuffer lease)
        where T : unmanaged
    {
        using SharedBuffer owned = lease;
        return CopyOut<T>(lease.Span);
    }

    /// <summary>Copies <paramref name="bytes"/> into a new array of <typeparamref name="T"/>.</summary>
    public static T[] CopyOut<T>(ReadOnlySpan<byte> bytes)
        where T : unmanaged
    {
        int size = Unsafe.SizeOf<T>();
        if (bytes.Length % size != 0)
        {
            throw new ProtocolViolationException($"A payload of {bytes.Length} bytes is not a whole number of {typeof(T).Name} ({size} bytes each).");
        }

        T[] array = GC.AllocateUninitializedArray<T>(bytes.Length / size);
        bytes.CopyTo(System.Runtime.InteropServices.MemoryMarshal.AsBytes(array.AsSpan()));
        return array;
    }
}

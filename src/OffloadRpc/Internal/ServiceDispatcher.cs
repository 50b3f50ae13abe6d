using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>Routes each request to the stub of the service that owns its method id, with <see cref="OffloadCallContext.Current"/> set.</summary>
internal sealed class ServiceDispatcher : IRequestHandler
{
    private readonly Dictionary<int, Target> _methods = new();
    private readonly List<ContractDescriptor> _contracts = new();
    private readonly SerializerOptionsSource _serializerOptions;
    private ServerPipeline? _pipeline;

    public ServiceDispatcher(SerializerOptionsSource serializerOptions) => _serializerOptions = serializerOptions;

    public IReadOnlyList<ContractDescriptor> Contracts => _contracts;

    /// <summary>Interceptors and logging of served calls; set before serving starts.</summary>
    public ServerPipeline? Pipeline
    {
        get => _pipeline;
        set => _pipeline = value;
    }

    /// <summary>A method's stub, and the factory of its implementation when one is made per call (from a DI scope, say).</summary>
    private sealed record Target(ServiceStub Stub, Func<ServerInterceptorContext, object>? Factory, MethodDescriptor Method);

    public void Add(ServiceDescriptor descriptor, ServiceStub stub) => Add(descriptor, stub, null);

    /// <summary>Serves <paramref name="descriptor"/> through <paramref name="stub"/> (made without an implementation) with an implementation made per call by <paramref name="factory"/>.</summary>
    public void Add(ServiceDescriptor descriptor, ServiceStub stub, Func<ServerInterceptorContext, object>? factory)
    {
        if (_contracts.Any(c => c.Name == descriptor.Name))
        {
            throw new InvalidOperationException($"{descriptor.Name} is already registered.");
        }

        foreach (MethodDescriptor method in descriptor.Methods)
        {
            if (_methods.ContainsKey(method.Id))
            {
                throw new InvalidOperationException($"Method id {method.Id} ({method.Name}) of {descriptor.Name} collides with a method of another registered service; rename one of the methods.");
            }
        }

        foreach (MethodDescriptor method in descriptor.Methods)
        {
            _methods.Add(method.Id, new Target(stub, factory, method));
        }

        _contracts.Add(new ContractDescriptor(descriptor.Name, descriptor.ContractHash));
    }

    public ValueTask HandleAsync(IncomingCall call) => DispatchAsync(call);

    /// <summary>
    /// Serves one request of any transport. A call with nothing around it (no per-call implementation, no
    /// interceptors, metadata or telemetry) runs the stub directly, timed only for the slow-call log when
    /// the server logs; anything else goes through <see cref="DispatchObservedAsync"/>.
    /// </summary>
    public ValueTask DispatchAsync(IInboundCall call)
    {
        if (!_methods.TryGetValue(call.MethodId, out Target? target))
        {
            throw new ProtocolViolationException($"No service registered on this server has method id {call.MethodId}: the client and the server were built from different contracts.");
        }

        ServerPipeline? pipeline = _pipeline;
        if (target.Factory is not null || pipeline is { Interceptors.Length: > 0 } || call.HasMetadata || Telemetry.ServerObserved)
        {
            return DispatchObservedAsync(call, target);
        }

        CallLogging? logging = pipeline is { SlowCallMilliseconds: < double.PositiveInfinity } ? pipeline : null;
        long started = logging is null ? 0 : logging.Now();
        var serverCall = new ServerCall(call, target.Method, _serializerOptions);
        ValueTask task;
        ExecutionContext? outer = ExecutionContext.Capture(); // null only while the flow is suppressed
        ServerCall? previous = outer is null ? OffloadCallContext.Serving : null;
        OffloadCallContext.Serving = serverCall;
        try
        {
            task = target.Stub.InvokeAsync(call.MethodId, serverCall);
        }
        catch (Exception ex) when (AsDecodeFailure(serverCall, ex) is { } violation)
        {
            serverCall.Complete(faulted: true);
            LogIfSlow(logging, started, target.Method, violation);
            throw violation;
        }
        catch (Exception ex)
        {
            serverCall.Complete(faulted: true);
            LogIfSlow(logging, started, target.Method, ex);
            throw;
        }
        finally
        {
            // Back to the caller's context, as an async method would be: this call, and any async local the
            // method set before it first awaited (Activity.Current, say), stay with the method's own
            // continuations and do not leak into the thread (the poller, on shared memory) that called it.
            // With the flow suppressed (no caller here does that) only the call itself is reset.
            if (outer is not null)
            {
                ExecutionContext.Restore(outer);
            }
            else
            {
                OffloadCallContext.Serving = previous;
            }
        }

        if (task.IsCompletedSuccessfully)
        {
            serverCall.Complete(faulted: false);
            LogIfSlow(logging, started, target.Method, null);
            return ValueTask.CompletedTask;
        }

        return CompleteAfterAsync(task, serverCall, logging, started);
    }

    /// <summary>The slow-call log of a call that went the direct way (an observed call logs through its <see cref="CallObservation"/>).</summary>
    private static void LogIfSlow(CallLogging? logging, long started, MethodDescriptor method, Exception? failure)
    {
        if (logging is not null)
        {
            double elapsed = logging.ElapsedMilliseconds(started);
            if (elapsed >= logging.SlowCallMilliseconds)
            {
                Diagnostics.Log.SlowCall(logging.Logger, Telemetry.Server.Side, method.FullName, elapsed, Telemetry.StatusOf(failure));
            }
        }
    }

    /// <summary>
    /// How early a cancellation may come and still be the deadline's: the call's timer (or the caller's,
    /// whose cancel then arrives) counts in ticks of the runtime's timer queue, and fires up to a tick
    /// before the deadline by this process's precise clock (the coarse clock it reads moves every few ms on Linux, 15.6 on Windows).
    /// </summary>
    private static readonly TimeSpan DeadlineSlack = TimeSpan.FromMilliseconds(20);

    /// <summary>
    /// A call with metadata, interceptors, a per-call implementation or telemetry: headers and deadline
    /// decoded (the token fires at the deadline), the server span made the caller's span's child, the
    /// interceptors run around the stub, and the call's duration and status recorded.
    /// </summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask DispatchObservedAsync(IInboundCall call, Target target)
    {
        MethodDescriptor method = target.Method;
        var serverCall = new ServerCall(call, method, _serializerOptions);
        CallMetadata? metadata = null;
        if (call.HasMetadata)
        {
            try
            {
                metadata = CallMetadata.Decode(call.Metadata);
            }
            catch (ProtocolViolationException violation)
            {
                serverCall.Complete(faulted: true);
                call.AbortConnection(violation);
                throw;
            }

            serverCall.RequestHeaders = metadata.Headers;
            if (metadata.DeadlineRemaining is { } remaining)
            {
                serverCall.Deadline = DateTime.UtcNow + remaining;
                if (remaining <= CallMetadata.MaxTimerDelay)
                {
                    call.CancelAfter(remaining);
                }
            }
        }

        ServerPipeline? pipeline = _pipeline;
        serverCall.Pipeline = pipeline;
        serverCall.ImplementationFactory = target.Factory;
        CallObservation observation = CallObservation.StartServer(method, metadata);
        OffloadCallContext.Serving = serverCall; // an async method: the caller's context is back when it returns
        Exception? failure = null;
        bool faulted = true;
        try
        {
            await target.Stub.InvokeAsync(method.Id, serverCall).ConfigureAwait(false);
            faulted = false;
        }
        catch (Exception ex) when (AsDecodeFailure(serverCall, ex) is { } violation)
        {
            failure = violation;
            throw violation;
        }
        catch (Exception ex)
        {
            failure = ex;
            throw;
        }
        finally
        {
            serverCall.Complete(faulted);
            string status = failure is OperationCanceledException && serverCall.Deadline is { } due && DateTime.UtcNow >= due - DeadlineSlack ? "deadline_exceeded" : Telemetry.StatusOf(failure);
            observation.Stop(status, failure, pipeline);
        }
    }

    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder))]
    private static async ValueTask CompleteAfterAsync(ValueTask task, ServerCall call, CallLogging? logging, long started)
    {
        Exception? failure = null;
        try
        {
            await task.ConfigureAwait(false);
        }
        catch (Exception ex) when (AsDecodeFailure(call, ex) is { } violation)
        {
            failure = violation;
            throw violation;
        }
        catch (Exception ex)
        {
            failure = ex;
            throw;
        }
        finally
        {
            call.Complete(faulted: failure is not null);
            LogIfSlow(logging, started, call.Method, failure);
        }
    }

    /// <summary>
    /// A failure before the arguments were decoded is the peer's: a body that does not decode (MessagePack
    /// errors, missing or malformed arguments) is a protocol violation that ends its connection, as any
    /// other malformed input does, not a fault answered to a caller that sent garbage. A failure before
    /// the stub was entered (an interceptor threw) is not, nor is no room for a buffer argument
    /// (<see cref="ArenaExhaustedException"/>: well-formed arguments this process cannot hold now).
    /// </summary>
    private static ProtocolViolationException? AsDecodeFailure(ServerCall call, Exception ex)
    {
        if (!call.StubInvoked || call.HasDecodedArguments || ex is OperationCanceledException or ArenaExhaustedException)
        {
            return null;
        }

        var violation = ex as ProtocolViolationException
            ?? new ProtocolViolationException($"A call of {call.Method.ServiceName}.{call.Method.Name} has arguments that do not decode: {ex.Message}", ex);
        call.Inbound.AbortConnection(violation);
        return violation;
    }
}

/// <summary>What a server's options add to every served call: interceptors and logging of slow calls.</summary>
internal sealed class ServerPipeline : CallLogging
{
    public ServerPipeline(ServerInterceptor[] interceptors, Microsoft.Extensions.Logging.ILogger logger, TimeSpan slowCallThreshold)
        : base(logger, slowCallThreshold) => Interceptors = interceptors;

    public ServerInterceptor[] Interceptors { get; }

    /// <summary>This pipeline's chains (a test hook reads how many were built).</summary>
    internal InterceptorChainCache Chains { get; } = new();

    /// <summary>The interceptors around a method with one result (built once per result type).</summary>
    public ServerCallContinuation<T> Chain<T>() =>
        Chains.Get<ServerInterceptor, ServerCallContinuation<T>>(Interceptors, static context => context.Call.RunHandler<T>(), static (interceptor, next) => context => interceptor.InterceptAsync(context, next));

    /// <summary>The interceptors around a method whose result is a stream (built once per item type).</summary>
    public ServerStreamContinuation<T> StreamChain<T>() =>
        Chains.Get<ServerInterceptor, ServerStreamContinuation<T>>(Interceptors, static context => context.Call.RunStreamHandler<T>(), static (interceptor, next) => context => interceptor.InterceptStream(context, next));

    /// <summary>The pipeline of <paramref name="options"/>, or null when they add nothing to a call.</summary>
    public static ServerPipeline? From(OffloadRpcOptions options)
    {
        ServerInterceptor[] interceptors = [.. options.ServerInterceptors];
        return interceptors.Length == 0 && options.LoggerFactory is null ? null : new ServerPipeline(interceptors, options.CreateLogger(), options.SlowCallThreshold);
    }
}

using System.Diagnostics;
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

    /// <summary>A method's stub: one for every call, or made per call (an implementation from a DI scope).</summary>
    private sealed record Target(ServiceStub? Stub, Func<ServerInterceptorContext, ServiceStub>? Factory, MethodDescriptor Method);

    public void Add(ServiceDescriptor descriptor, ServiceStub stub) => Add(descriptor, stub, null);

    /// <summary>Serves <paramref name="descriptor"/> with a stub made per call by <paramref name="factory"/>.</summary>
    public void Add(ServiceDescriptor descriptor, Func<ServerInterceptorContext, ServiceStub> factory) => Add(descriptor, null, factory);

    private void Add(ServiceDescriptor descriptor, ServiceStub? stub, Func<ServerInterceptorContext, ServiceStub>? factory)
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

    /// <summary>Serves one request of any transport.</summary>
    public ValueTask DispatchAsync(IInboundCall call)
    {
        if (!_methods.TryGetValue(call.MethodId, out Target? target))
        {
            throw new ProtocolViolationException($"No service registered on this server has method id {call.MethodId}: the client and the server were built from different contracts.");
        }

        if (target.Stub is null || _pipeline is not null || call.HasMetadata || Telemetry.ServerObserved)
        {
            return DispatchObservedAsync(call, target);
        }

        var serverCall = new ServerCall(call, target.Method, _serializerOptions) { StubInvoked = true };
        ValueTask task;
        OffloadCallContext? previous = OffloadCallContext.Current;
        OffloadCallContext.Current = new OffloadCallContext(serverCall);
        try
        {
            task = target.Stub.InvokeAsync(call.MethodId, serverCall);
        }
        catch (Exception ex) when (AsDecodeFailure(serverCall, ex) is { } violation)
        {
            serverCall.Complete(faulted: true);
            throw violation;
        }
        catch
        {
            serverCall.Complete(faulted: true);
            throw;
        }
        finally
        {
            OffloadCallContext.Current = previous; // the method's own continuations keep the context they captured
        }

        if (task.IsCompletedSuccessfully)
        {
            serverCall.Complete(faulted: false);
            return ValueTask.CompletedTask;
        }

        return CompleteAfterAsync(task, serverCall);
    }

    /// <summary>
    /// A call with metadata, interceptors, a per-call implementation or telemetry: headers and deadline
    /// decoded (the token fires at the deadline), the server span made the caller's span's child, the
    /// interceptors run around the stub, and the call's duration and status recorded.
    /// </summary>
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
        long started = Stopwatch.GetTimestamp();
        Activity? activity = Telemetry.StartServer(method, metadata?.TraceParent, metadata?.TraceState);
        bool active = Telemetry.ServerActive.Enabled;
        if (Telemetry.ServerStarted.Enabled)
        {
            Telemetry.ServerStarted.Add(1, Telemetry.Tags(method));
        }

        if (active)
        {
            Telemetry.ServerActive.Add(1, Telemetry.Tags(method));
        }

        var context = new ServerInterceptorContext(serverCall, serverCall.Deadline);
        OffloadCallContext.Current = new OffloadCallContext(serverCall); // an async method: the caller's context is back when it returns
        Exception? failure = null;
        bool faulted = true;
        try
        {
            ServerInterceptor[]? interceptors = pipeline?.Interceptors;
            if (interceptors is null || interceptors.Length == 0)
            {
                await InvokeStub(context, target).ConfigureAwait(false);
            }
            else
            {
                await Continuation(interceptors, 0, target)(context).ConfigureAwait(false);
            }

            if (!serverCall.StubInvoked && method.HasResult)
            {
                throw new InvalidOperationException($"A server interceptor returned from {method.FullName}, which has a result, without calling the method or throwing.");
            }

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
            string status = failure is OperationCanceledException && serverCall.Deadline is { } due && DateTime.UtcNow >= due ? "deadline_exceeded" : Telemetry.StatusOf(failure);
            double elapsed = Stopwatch.GetElapsedTime(started).TotalMilliseconds;
            if (active)
            {
                Telemetry.ServerActive.Add(-1, Telemetry.Tags(method));
            }

            if (Telemetry.ServerCompleted.Enabled)
            {
                Telemetry.ServerCompleted.Add(1, Telemetry.Tags(method, status));
            }

            if (Telemetry.ServerDuration.Enabled)
            {
                Telemetry.ServerDuration.Record(elapsed, Telemetry.Tags(method, status));
            }

            Telemetry.Stop(activity, status, failure);
            if (pipeline is not null && elapsed >= pipeline.SlowCallMilliseconds)
            {
                Diagnostics.Log.SlowCall(pipeline.Logger, "server", method.FullName, elapsed, status);
            }
        }
    }

    private static ServerCallContinuation Continuation(ServerInterceptor[] interceptors, int index, Target target)
    {
        if (index == interceptors.Length)
        {
            return context => InvokeStub(context, target);
        }

        ServerInterceptor interceptor = interceptors[index];
        ServerCallContinuation next = Continuation(interceptors, index + 1, target);
        return context => interceptor.InterceptAsync(context, next);
    }

    private static ValueTask InvokeStub(ServerInterceptorContext context, Target target)
    {
        ServerCall call = context.Call;
        if (call.StubInvoked)
        {
            throw new InvalidOperationException($"A server interceptor continued {call.Method.FullName} twice: a call's continuation runs at most once.");
        }

        ServiceStub stub = target.Stub ?? target.Factory!(context);
        call.StubInvoked = true;
        return stub.InvokeAsync(call.Method.Id, call);
    }

    private static async ValueTask CompleteAfterAsync(ValueTask task, ServerCall call)
    {
        bool faulted = true;
        try
        {
            await task.ConfigureAwait(false);
            faulted = false;
        }
        catch (Exception ex) when (AsDecodeFailure(call, ex) is { } violation)
        {
            throw violation;
        }
        finally
        {
            call.Complete(faulted);
        }
    }

    /// <summary>
    /// A failure before the arguments were decoded is the peer's: a body that does not decode (MessagePack
    /// errors, missing or malformed arguments) is a protocol violation that ends its connection, as any
    /// other malformed input does, not a fault answered to a caller that sent garbage. A failure before
    /// the stub was entered (an interceptor threw) is not.
    /// </summary>
    private static ProtocolViolationException? AsDecodeFailure(ServerCall call, Exception ex)
    {
        if (!call.StubInvoked || call.HasDecodedArguments || ex is OperationCanceledException)
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
internal sealed class ServerPipeline
{
    public ServerPipeline(ServerInterceptor[] interceptors, Microsoft.Extensions.Logging.ILogger logger, TimeSpan slowCallThreshold)
    {
        Interceptors = interceptors;
        Logger = logger;
        SlowCallMilliseconds = logger == Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance ? double.PositiveInfinity : slowCallThreshold.TotalMilliseconds;
    }

    public ServerInterceptor[] Interceptors { get; }

    public Microsoft.Extensions.Logging.ILogger Logger { get; }

    public double SlowCallMilliseconds { get; }

    /// <summary>The pipeline of <paramref name="options"/>, or null when they add nothing to a call.</summary>
    public static ServerPipeline? From(OffloadRpcOptions options)
    {
        ServerInterceptor[] interceptors = [.. options.ServerInterceptors];
        return interceptors.Length == 0 && options.LoggerFactory is null ? null : new ServerPipeline(interceptors, options.CreateLogger(), options.SlowCallThreshold);
    }
}

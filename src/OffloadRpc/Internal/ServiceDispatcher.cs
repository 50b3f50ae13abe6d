using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>Routes each request to the stub of the service that owns its method id, with <see cref="OffloadCallContext.Current"/> set.</summary>
internal sealed class ServiceDispatcher : IRequestHandler
{
    private readonly Dictionary<int, (ServiceStub Stub, MethodDescriptor Method)> _methods = new();
    private readonly List<ContractDescriptor> _contracts = new();
    private readonly SerializerOptionsSource _serializerOptions;

    public ServiceDispatcher(SerializerOptionsSource serializerOptions) => _serializerOptions = serializerOptions;

    public IReadOnlyList<ContractDescriptor> Contracts => _contracts;

    public void Add(ServiceDescriptor descriptor, ServiceStub stub)
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
            _methods.Add(method.Id, (stub, method));
        }

        _contracts.Add(new ContractDescriptor(descriptor.Name, descriptor.ContractHash));
    }

    public ValueTask HandleAsync(IncomingCall call) => DispatchAsync(call);

    /// <summary>Serves one request of any transport.</summary>
    public ValueTask DispatchAsync(IInboundCall call)
    {
        if (!_methods.TryGetValue(call.MethodId, out (ServiceStub Stub, MethodDescriptor Method) target))
        {
            throw new ProtocolViolationException($"No service registered on this server has method id {call.MethodId}: the client and the server were built from different contracts.");
        }

        var serverCall = new ServerCall(call, target.Method, _serializerOptions);
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
    /// other malformed input does, not a fault answered to a caller that sent garbage.
    /// </summary>
    private static ProtocolViolationException? AsDecodeFailure(ServerCall call, Exception ex)
    {
        if (call.HasDecodedArguments || ex is OperationCanceledException)
        {
            return null;
        }

        var violation = ex as ProtocolViolationException
            ?? new ProtocolViolationException($"A call of {call.Method.ServiceName}.{call.Method.Name} has arguments that do not decode: {ex.Message}", ex);
        call.Inbound.AbortConnection(violation);
        return violation;
    }
}

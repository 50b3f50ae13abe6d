using OffloadRpc.Transport;

namespace OffloadRpc.Runtime;

/// <summary>Routes each request to the stub of the service that owns its method id, with <see cref="OffloadCallContext.Current"/> set.</summary>
internal sealed class ServiceDispatcher : IRequestHandler
{
    private readonly Dictionary<int, ServiceStub> _methods = new();
    private readonly List<ContractDescriptor> _contracts = new();

    public IReadOnlyList<ContractDescriptor> Contracts => _contracts;

    public void Add(ServiceDescriptor descriptor, ServiceStub stub)
    {
        if (_contracts.Any(c => c.Name == descriptor.Name))
        {
            throw new InvalidOperationException($"{descriptor.Name} is already registered.");
        }

        foreach (int id in descriptor.MethodIds)
        {
            if (_methods.ContainsKey(id))
            {
                throw new InvalidOperationException($"Method id {id} of {descriptor.Name} collides with a method of another registered service; rename one of the methods.");
            }
        }

        foreach (int id in descriptor.MethodIds)
        {
            _methods.Add(id, stub);
        }

        _contracts.Add(new ContractDescriptor(descriptor.Name, descriptor.ContractHash));
    }

    public ValueTask HandleAsync(IncomingCall call)
    {
        if (!_methods.TryGetValue(call.MethodId, out ServiceStub? stub))
        {
            throw new ProtocolViolationException($"No service registered on this server has method id {call.MethodId}: the client and the server were built from different contracts.");
        }

        var serverCall = new ServerCall(call);
        ValueTask task;
        OffloadCallContext? previous = OffloadCallContext.Current;
        OffloadCallContext.Current = new OffloadCallContext(call.Connection, serverCall);
        try
        {
            task = stub.InvokeAsync(call.MethodId, serverCall);
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
        finally
        {
            call.Complete(faulted);
        }
    }
}

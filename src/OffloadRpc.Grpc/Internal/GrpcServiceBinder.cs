using global::Grpc.AspNetCore.Server.Model;
using global::Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Hosting.Internal;
using OffloadRpc.Internal;
using OffloadRpc.Transport;

namespace OffloadRpc.Grpc.Internal;

/// <summary>The gRPC service every OffloadRpc method is bound to (its instance is never used: the methods route to the dispatcher).</summary>
internal sealed class OffloadRpcGrpcService
{
}

/// <summary>
/// Binds, without a .proto, every method of every service registered with
/// AddOffloadRpcServer(...).AddService&lt;...&gt;() as <c>/{Namespace.Interface}/{Method}</c>, plus the
/// well-known Describe method; each call is served by the dispatcher of that endpoint's hosted server,
/// with its interceptors, DI scope per call, metrics and traces.
/// </summary>
internal sealed class GrpcServiceBinder(IServiceProvider services) : IServiceMethodProvider<OffloadRpcGrpcService>
{
    public void OnServiceMethodDiscovery(ServiceMethodProviderContext<OffloadRpcGrpcService> context)
    {
        ServerRegistration[] registrations = [.. services.GetServices<ServerRegistration>()];
        HostedServers hosted = services.GetRequiredService<HostedServers>();
        context.AddUnaryMethod(GrpcWire.DescribeServed, [], (_, request, call) =>
        {
            request.Release();
            return Task.FromResult(new Frame(FrameKind.Head, Describe(registrations, hosted).Encode()));
        });

        var bound = new HashSet<string>();
        foreach (ServerRegistration registration in registrations)
        {
            foreach (OffloadRpc.Internal.ServiceDescriptor descriptor in registration.Descriptors)
            {
                foreach (MethodDescriptor method in descriptor.Methods)
                {
                    if (!bound.Add(method.FullName))
                    {
                        throw new InvalidOperationException($"{method.FullName} is bound twice: over gRPC a method is named by its service and name, so overloads and a service on two endpoints cannot both be served.");
                    }

                    var route = new MethodRoute(hosted.For(registration), method);
                    Method<Frame, Frame> grpc = GrpcWire.ServerMethod(method);
                    switch (grpc.Type)
                    {
                        case MethodType.Unary:
                            context.AddUnaryMethod(grpc, [], (_, request, call) => route.ServeUnaryAsync(request, call));
                            break;
                        case MethodType.ClientStreaming:
                            context.AddClientStreamingMethod(grpc, [], (_, requests, call) => route.ServeClientStreamingAsync(requests, call));
                            break;
                        case MethodType.ServerStreaming:
                            context.AddServerStreamingMethod(grpc, [], (_, request, responses, call) => route.ServeServerStreamingAsync(request, responses, call));
                            break;
                        default:
                            context.AddDuplexStreamingMethod(grpc, [], (_, requests, responses, call) => route.ServeAsync(requests, responses, call));
                            break;
                    }
                }
            }
        }
    }

    private static ServerDescription Describe(ServerRegistration[] registrations, HostedServers hosted)
    {
        var contracts = new Dictionary<string, ulong>();
        string? socket = null;
        int listening = 0;
        bool advertise = true;
        foreach (ServerRegistration registration in registrations)
        {
            foreach (OffloadRpc.Internal.ServiceDescriptor descriptor in registration.Descriptors)
            {
                contracts[descriptor.Name] = descriptor.ContractHash;
            }

            OffloadRpcServer? server = hosted.For(registration).Server;
            advertise &= server?.Options.AdvertiseSharedMemory ?? false; // not started: no socket to switch to, nothing to tell
            if (server is { IsListening: true, SocketPath: { } path })
            {
                socket = path;
                listening++;
            }
        }

        if (!advertise)
        {
            // No boot id: no client takes this for its own host, and nothing of the host or the process is told.
            return new ServerDescription { UserId = uint.MaxValue, ProcessId = -1, Contracts = contracts };
        }

        return new ServerDescription
        {
            BootId = ServerDescription.ThisBootId,
            UserId = Interop.LinuxNative.GetEuid(),
            ProcessId = Environment.ProcessId,
            SocketPath = listening == 1 && registrations.Length == 1 ? socket : null, // one endpoint serves them all, or no switch
            Contracts = contracts,
        };
    }
}

/// <summary>
/// One bound method: reads the request's frames, dispatches, writes the reply's frames or ends with the
/// fault. Bound as unary or client streaming (the reply is one frame), server streaming (the request is
/// one frame) or duplex, by its shape (<see cref="GrpcWire.BindingOf"/>).
/// </summary>
internal sealed class MethodRoute(HostedServer server, MethodDescriptor method)
{
    /// <summary>
    /// A unary call: one frame in, one frame out (gRPC writes it with the status after this returns). A
    /// method that completes at once is answered without an async step of this method's own.
    /// </summary>
    public Task<Frame> ServeUnaryAsync(Frame request, ServerCallContext context)
    {
        ValueTask<GrpcInboundCall> dispatched;
        try
        {
            OffloadRpcServer host = Host(request);
            InboundRequest inbound = RequestOf(context, request);
            dispatched = DispatchAsync(host, OneFrame(host, request), inbound, null, null, context);
        }
        catch (Exception ex)
        {
            return Task.FromException<Frame>(ex);
        }

        if (!dispatched.IsCompletedSuccessfully)
        {
            return ReplyAfterAsync(dispatched);
        }

        GrpcInboundCall call = dispatched.Result;
        try
        {
            return Task.FromResult(ReplyFrame(call));
        }
        catch (Exception ex)
        {
            return Task.FromException<Frame>(ex);
        }
        finally
        {
            call.Dispose();
        }
    }

    private async Task<Frame> ReplyAfterAsync(ValueTask<GrpcInboundCall> dispatched)
    {
        using GrpcInboundCall call = await dispatched.ConfigureAwait(false);
        return ReplyFrame(call);
    }

    /// <summary>A client-streaming call: the request's frames (its buffers in chunks) in, one frame out.</summary>
    public async Task<Frame> ServeClientStreamingAsync(IAsyncStreamReader<Frame> requests, ServerCallContext context)
    {
        OffloadRpcServer host = Host();
        InboundRequest inbound = RequestOf(context, null);
        ReceivedRequest request = await ReadRequestAsync(host, requests, context).ConfigureAwait(false);
        using GrpcInboundCall call = await DispatchAsync(host, request, inbound, null, null, context).ConfigureAwait(false);
        return ReplyFrame(call);
    }

    /// <summary>A server-streaming call: one frame in; the streamed result's items, then the reply's frames out.</summary>
    public async Task ServeServerStreamingAsync(Frame request, IServerStreamWriter<Frame> responses, ServerCallContext context)
    {
        OffloadRpcServer host = Host(request);
        InboundRequest inbound = RequestOf(context, request);
        using GrpcInboundCall call = await DispatchAsync(host, OneFrame(host, request), inbound, null, responses, context).ConfigureAwait(false);
        await WriteReplyAsync(call, responses, context).ConfigureAwait(false);
    }

    /// <summary>A duplex call: the request's frames, then a streamed argument's items in; credit, a streamed result's items, then the reply out.</summary>
    public async Task ServeAsync(IAsyncStreamReader<Frame> requests, IServerStreamWriter<Frame> responses, ServerCallContext context)
    {
        OffloadRpcServer host = Host();
        InboundRequest inbound = RequestOf(context, null);
        ReceivedRequest request = await ReadRequestAsync(host, requests, context).ConfigureAwait(false);
        using GrpcInboundCall call = await DispatchAsync(host, request, inbound, requests, responses, context).ConfigureAwait(false);
        await WriteReplyAsync(call, responses, context).ConfigureAwait(false);
    }

    /// <summary>The request's metadata block and connection, before anything else of the request is read; a header that is not base64 ends the call (InvalidArgument) and gives <paramref name="request"/> back.</summary>
    private static InboundRequest RequestOf(ServerCallContext context, Frame? request)
    {
        try
        {
            return InboundRequest.Of(context);
        }
        catch
        {
            request?.Release();
            throw;
        }
    }

    private OffloadRpcServer Host() =>
        server.Server ?? throw new RpcException(new Status(StatusCode.Unavailable, $"The OffloadRpc server of {server.Endpoint} is not started."));

    /// <summary><see cref="Host()"/>, giving <paramref name="request"/> back when there is none.</summary>
    private OffloadRpcServer Host(Frame request)
    {
        if (server.Server is { } host)
        {
            return host;
        }

        request.Release();
        return Host();
    }

    /// <summary>The request of a method bound with one request message: its head frame must be all of it.</summary>
    private ReceivedRequest OneFrame(OffloadRpcServer host, Frame request)
    {
        AcceptHead(host, request);
        if (request.WholeMessagePayloads(host.Options.MaxMessageBytes) is >= 0 and int payloads)
        {
            return new ReceivedRequest(request, payloads); // the frame is the message, its payloads in it
        }

        var assembler = new MessageAssembler(host.Options.MaxMessageBytes, host.RequestBudget);
        try
        {
            if (!assembler.Accept(request))
            {
                throw new ProtocolViolationException($"The request of {method.FullName} names buffers beyond its one frame, but the method takes none.");
            }
        }
        catch (Exception ex)
        {
            assembler.Dispose();
            if (StatusOf(ex) is { } status)
            {
                throw status;
            }

            throw;
        }

        return assembler;
    }

    /// <summary>
    /// A request starts with a head frame: an item's head, credit, a fault or data there breaks the protocol.
    /// A large head counts against the server's budget while its call runs (<see cref="Charge"/>). Either
    /// failure gives the frame back.
    /// </summary>
    private void AcceptHead(OffloadRpcServer host, Frame first)
    {
        if (first.Kind != FrameKind.Head)
        {
            first.Release();
            throw GrpcWire.Violation(new ProtocolViolationException($"The request of {method.FullName} starts with a {first.Kind} frame, not its head."));
        }

        if (first.IsChargeable)
        {
            Charge(host, first);
        }
    }

    /// <summary>A large request head, kept while its call runs, counts against the server's budget (<see cref="Frame.ChargeTo"/>); without room the call ends with ResourceExhausted and the frame is given back.</summary>
    private static void Charge(OffloadRpcServer host, Frame head)
    {
        try
        {
            head.ChargeTo(host.RequestBudget);
        }
        catch (ArenaExhaustedException full)
        {
            head.Release();
            throw NoRoom(full);
        }
    }

    /// <summary>A request that could not be assembled, as the status its call ends with: a violation, or no room; null for anything else (thrown as it is).</summary>
    private static RpcException? StatusOf(Exception failure) => failure switch
    {
        ProtocolViolationException violation => GrpcWire.Violation(violation),
        ArenaExhaustedException full => NoRoom(full),
        _ => null,
    };

    /// <summary>No room in this process for the request's buffers now (<see cref="LocalLeases"/>): the caller may retry.</summary>
    private static RpcException NoRoom(ArenaExhaustedException full) => new(new Status(StatusCode.ResourceExhausted, full.Message));

    /// <summary>Reads frames until the request is whole (a streamed argument's items come after it, read by the method).</summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<ReceivedRequest> ReadRequestAsync(OffloadRpcServer host, IAsyncStreamReader<Frame> requests, ServerCallContext context)
    {
        Frame head;
        try
        {
            if (!await requests.MoveNext(context.CancellationToken).ConfigureAwait(false))
            {
                throw new ProtocolViolationException($"The request of {method.FullName} ended before its last byte.");
            }

            head = requests.Current;
        }
        catch (ProtocolViolationException violation)
        {
            throw GrpcWire.Violation(violation); // a frame that does not deserialize, or none
        }

        AcceptHead(host, head);

        if (head.WholeMessagePayloads(host.Options.MaxMessageBytes) is >= 0 and int payloads)
        {
            return new ReceivedRequest(head, payloads); // one frame, its payloads in it: no assembler
        }

        var assembler = new MessageAssembler(host.Options.MaxMessageBytes, host.RequestBudget);
        assembler.ReceiveArray(method.ArgumentArray, MessageAssembler.MaxArrayArgumentBytes); // a T[] argument, the method's one buffer, is read into its array, not copied out of a lease
        try
        {
            if (!assembler.Accept(head))
            {
                assembler.ReceiveInPlace();
            }

            while (!assembler.IsComplete && await requests.MoveNext(context.CancellationToken).ConfigureAwait(false))
            {
                if (!assembler.Accept(requests.Current))
                {
                    assembler.ReceiveInPlace(); // the buffers' frames go straight into their leases (for the rest of this method)
                }
            }
        }
        catch (Exception ex)
        {
            assembler.Dispose();
            if (StatusOf(ex) is { } status)
            {
                throw status;
            }

            throw;
        }

        if (!assembler.IsComplete)
        {
            assembler.Dispose();
            throw GrpcWire.Violation(new ProtocolViolationException($"The request of {method.FullName} ended before its last byte."));
        }

        return assembler;
    }

    /// <summary>
    /// Dispatches the call; the returned call holds the reply. A failure is thrown as the status it ends the
    /// call with. A method that completed at once without starting the response writer is done without an async step.
    /// </summary>
    private ValueTask<GrpcInboundCall> DispatchAsync(OffloadRpcServer host, ReceivedRequest request, InboundRequest inbound, IAsyncStreamReader<Frame>? requests, IServerStreamWriter<Frame>? responses, ServerCallContext context)
    {
        var call = new GrpcInboundCall(method.Id, request, context, inbound, requests, responses, host.Options.StreamWindow, host.Options.MaxMessageBytes, host.RequestBudget);
        ValueTask dispatched;
        try
        {
            dispatched = host.Dispatcher.DispatchAsync(call);
        }
        catch (Exception ex)
        {
            dispatched = ValueTask.FromException(ex);
        }

        return dispatched.IsCompletedSuccessfully && !call.HasResponseWriter ? new ValueTask<GrpcInboundCall>(call) : FinishAsync(dispatched, call, context);
    }

    /// <summary>The rest of <see cref="DispatchAsync"/>: awaits the method, then its streamed result's items.</summary>
    [System.Runtime.CompilerServices.AsyncMethodBuilder(typeof(System.Runtime.CompilerServices.PoolingAsyncValueTaskMethodBuilder<>))]
    private async ValueTask<GrpcInboundCall> FinishAsync(ValueTask dispatched, GrpcInboundCall call, ServerCallContext context)
    {
        Exception? failure = null;
        try
        {
            await dispatched.ConfigureAwait(false);
        }
        catch (Exception ex)
        {
            failure = ex;
        }

        try
        {
            await call.FinishItemsAsync().ConfigureAwait(false); // a streamed result's items go before its end
        }
        catch (Exception ex) when (failure is not null || context.CancellationToken.IsCancellationRequested)
        {
            failure ??= ex;
        }
        catch
        {
            call.Dispose();
            throw;
        }

        if (failure is not null)
        {
            RpcException status = Translate(failure, call, context);
            call.Dispose();
            throw status;
        }

        return call;
    }

    /// <summary>The reply of a method whose reply is one frame, which gRPC writes (and gives back) after the method returned.</summary>
    private Frame ReplyFrame(GrpcInboundCall call)
    {
        if (call.TakeReplyHead() is { } head)
        {
            return head; // a reply of one frame: the frame alone, no message around it
        }

        using OutgoingMessage reply = call.TakeReply();
        if (!reply.IsSingleFrame)
        {
            throw GrpcWire.Violation(new ProtocolViolationException($"The reply of {method.FullName} carries buffers its contract does not declare."));
        }

        return reply.DetachHead(releaseAfterWrite: true);
    }

    private static async Task WriteReplyAsync(GrpcInboundCall call, IServerStreamWriter<Frame> responses, ServerCallContext context)
    {
        using OutgoingMessage reply = call.TakeReply();
        if (reply.IsSingleFrame)
        {
            responses.WriteOptions = Last;
            await responses.WriteAsync(reply.Head, context.CancellationToken).ConfigureAwait(false);
            return;
        }

        using IEnumerator<Frame> frames = reply.Frames().GetEnumerator();
        bool more = frames.MoveNext();
        while (more)
        {
            Frame frame = frames.Current;
            more = frames.MoveNext();
            if (!more)
            {
                responses.WriteOptions = Last;
            }

            await responses.WriteAsync(frame, context.CancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>The reply's last frame is not flushed on its own: it goes out with the call's status, in one write.</summary>
    private static readonly WriteOptions Last = new(WriteFlags.BufferHint);

    private RpcException Translate(Exception ex, GrpcInboundCall call, ServerCallContext context)
    {
        if (call.Violation is not null || ex is ProtocolViolationException)
        {
            return GrpcWire.Violation(call.Violation ?? (ProtocolViolationException)ex);
        }

        if (ex is ArenaExhaustedException full)
        {
            return NoRoom(full); // an item of a streamed argument this process had no room for
        }

        if (ex is OperationCanceledException && context.CancellationToken.IsCancellationRequested)
        {
            return new RpcException(new Status(StatusCode.Cancelled, "The caller cancelled the call."));
        }

        if (ex is OperationCanceledException && call.CancellationToken.IsCancellationRequested)
        {
            return new RpcException(new Status(StatusCode.DeadlineExceeded, $"{method.FullName} passed its deadline."));
        }

        return GrpcWire.Fault(ex);
    }
}
